//! `imgcache volume ...`: copy-on-write volumes over images, talking to the daemon.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;

use imgcache::api::client::Client;
use imgcache::catalog::validate_volume_name;
use imgcache::catalog::volumes::validate_snapshot_name;
use imgcache::daemon::volumes::{CreateVolume, VolumeInfo};
use imgcache::types::{format_size, parse_size};

use super::print_out;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume over an image (instant, no copy) or from a snapshot
    Create {
        /// Name of the new volume
        #[arg(value_parser = parse_volume_name)]
        name: String,
        /// Base image (name or id)
        #[arg(
            long,
            value_name = "IMAGE",
            required_unless_present = "snapshot",
            conflicts_with = "snapshot"
        )]
        image: Option<String>,
        /// Copy snapshot SNAP of volume VOL
        #[arg(long, value_name = "VOL@SNAP")]
        snapshot: Option<String>,
        /// Virtual size, at least the image's [default: the image's size]
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: Option<u64>,
    },
    /// List volumes
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Show one volume (with flatten progress)
    Show {
        volume: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume, its overlay and its snapshots
    Delete { volume: String },
    /// Grow a volume; the new tail reads as zeros
    Resize {
        volume: String,
        /// New virtual size, e.g. 20G
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Take a snapshot of a volume
    Snapshot {
        volume: String,
        #[arg(value_parser = parse_snapshot_name)]
        snapshot: String,
    },
    /// List the snapshots of a volume
    Snapshots {
        volume: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Make a volume's content that of a snapshot again (the snapshot stays)
    Revert { volume: String, snapshot: String },
    /// Delete a snapshot of a volume
    DeleteSnapshot { volume: String, snapshot: String },
    /// Copy every image block into the volume in the background, so it no longer needs the image
    Flatten {
        volume: String,
        /// Bytes per second at most, e.g. 100M [default: unlimited]
        #[arg(long, value_name = "LIMIT", value_parser = parse_size)]
        rate: Option<u64>,
        /// Wait until the flatten finished
        #[arg(long)]
        wait: bool,
    },
}

fn parse_volume_name(s: &str) -> Result<String, String> {
    validate_volume_name(s).map(|()| s.to_string())
}

fn parse_snapshot_name(s: &str) -> Result<String, String> {
    validate_snapshot_name(s).map(|()| s.to_string())
}

pub async fn run(client: Client, cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            image,
            snapshot,
            size,
        } => {
            if let Some(s) = &snapshot {
                if !s.contains('@') {
                    bail!("invalid --snapshot {s:?}: use VOLUME@SNAPSHOT");
                }
            }
            let v = client
                .create_volume(&CreateVolume {
                    name,
                    image,
                    snapshot,
                    size,
                })
                .await?;
            print_out(&format!(
                "created volume {} ({}) over image {}\nexport: volumes/{}\n",
                v.record.name,
                format_size(v.record.size),
                v.record.image_name,
                v.record.name
            ))
        }
        VolumeCommand::List { json } => {
            let vols = client.list_volumes().await?;
            if json {
                return print_out(&(serde_json::to_string_pretty(&vols)? + "\n"));
            }
            print_out(&format_table(&vols))
        }
        VolumeCommand::Show { volume, json } => {
            let v = client.get_volume(&volume).await?;
            if json {
                return print_out(&(serde_json::to_string_pretty(&v)? + "\n"));
            }
            print_out(&format_show(&v))
        }
        VolumeCommand::Delete { volume } => {
            let r = client.delete_volume(&volume).await?;
            print_out(&format!("deleted volume {} ({})\n", r.name, r.id))
        }
        VolumeCommand::Resize { volume, size } => {
            let v = client.resize_volume(&volume, size).await?;
            print_out(&format!(
                "volume {} is now {} ({} bytes)\n",
                v.record.name,
                format_size(v.record.size),
                v.record.size
            ))
        }
        VolumeCommand::Snapshot { volume, snapshot } => {
            let v = client.snapshot_volume(&volume, &snapshot).await?;
            print_out(&format!("snapshot {}@{snapshot} taken\n", v.record.name))
        }
        VolumeCommand::Snapshots { volume, json } => {
            let snaps = client.volume_snapshots(&volume).await?;
            if json {
                return print_out(&(serde_json::to_string_pretty(&snaps)? + "\n"));
            }
            let mut out = String::from("NAME  SIZE\n");
            for s in snaps {
                out += &format!("{}  {}\n", s.name, format_size(s.size));
            }
            print_out(&out)
        }
        VolumeCommand::Revert { volume, snapshot } => {
            let v = client.revert_volume(&volume, &snapshot).await?;
            print_out(&format!(
                "volume {} reverted to snapshot {snapshot}\n",
                v.record.name
            ))
        }
        VolumeCommand::DeleteSnapshot { volume, snapshot } => {
            client.delete_volume_snapshot(&volume, &snapshot).await?;
            print_out(&format!("deleted snapshot {volume}@{snapshot}\n"))
        }
        VolumeCommand::Flatten { volume, rate, wait } => {
            let mut v = client.flatten_volume(&volume, rate).await?;
            if wait {
                while v.flatten.as_ref().is_some_and(|f| f.running) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    v = client.get_volume(&volume).await?;
                }
                if let Some(e) = v.flatten.as_ref().and_then(|f| f.error.clone()) {
                    bail!("flatten of volume {volume} failed: {e}");
                }
                return print_out(&format!("volume {} is flattened\n", v.record.name));
            }
            print_out(&format!(
                "flattening volume {} in the background; see `imgcache volume show {}`\n",
                v.record.name, v.record.name
            ))
        }
    }
}

fn format_table(vols: &[VolumeInfo]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "SIZE".into(),
        "IMAGE".into(),
        "ALLOCATED".into(),
        "SNAPSHOTS".into(),
        "FLATTENED".into(),
    ]];
    for v in vols {
        rows.push([
            v.record.name.clone(),
            format_size(v.record.size),
            v.record.image_name.clone(),
            format_size(v.allocated_bytes),
            v.snapshots.len().to_string(),
            if v.record.flattened { "yes" } else { "no" }.into(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            line += &format!("{cell:<w$}  ", w = widths[c]);
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

fn format_show(v: &VolumeInfo) -> String {
    let r = &v.record;
    let flatten = match &v.flatten {
        None if r.flattened => "done".to_string(),
        None => "-".to_string(),
        Some(f) => {
            let pct = if f.total_bytes == 0 {
                100.0
            } else {
                (f.done_bytes as f64 * 100.0 / f.total_bytes as f64).min(100.0)
            };
            let state = match (&f.error, f.running, r.flattened) {
                (Some(e), _, _) => format!("failed: {e}"),
                (None, true, _) => "running".into(),
                (None, false, true) => "done".into(),
                (None, false, false) => "stopped".into(),
            };
            format!(
                "{state}, {pct:.1}% ({} of {})",
                format_size(f.done_bytes),
                format_size(f.total_bytes)
            )
        }
    };
    let fields = [
        ("id", r.id.to_string()),
        ("name", r.name.clone()),
        ("export", format!("volumes/{}", r.name)),
        (
            "size",
            format!("{} ({} bytes)", format_size(r.size), r.size),
        ),
        ("image", format!("{} ({})", r.image_name, r.image_id)),
        ("image status", v.image_status.clone()),
        ("allocated", format_size(v.allocated_bytes)),
        ("snapshots", v.snapshots.join(", ")),
        ("origin", r.origin.clone().unwrap_or_else(|| "-".into())),
        ("flattened", r.flattened.to_string()),
        (
            "reads from",
            match &v.base_store {
                Some(store) => format!("image {} in store {store}", r.image_name),
                None if r.flattened => {
                    "its own overlay only (needs neither the image nor a store)".into()
                }
                None => "-".into(),
            },
        ),
        ("flatten", flatten),
        ("connections", v.connections.to_string()),
    ];
    let mut out = String::new();
    for (k, val) in fields {
        out += format!("{:<14}{val}", format!("{k}:")).trim_end();
        out.push('\n');
    }
    out
}
