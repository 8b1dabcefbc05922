//! The `imgcache` command: `imgcache serve` runs the daemon; `imgcache image ...` talks to it
//! over the control socket.
//!
//! Exit codes: 0 success, 1 failure (one `error: MESSAGE` line on stderr), 2 usage errors
//! (clap's own message). Arguments are checked here (names, sizes, enums, tags, properties)
//! before anything is sent, so typos fail fast and identically whether or not the daemon runs.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{ArgAction, Args, Parser, Subcommand};

#[path = "cli/volume.rs"]
mod volume_cmd;

use imgcache::api::client::{Action, Client};
use imgcache::api::types::{
    AddImageRequest, AddProgress, CacheView, PushRequest, StoreInfo, WarmRequest,
};
use imgcache::catalog::{
    validate_architecture, validate_name, validate_property, validate_tag, ContainerFormat,
    DiskFormat, Firmware, ImageAttributes, ImagePatch, ImageRecord, ImageType, Lifecycle, OsType,
    Visibility,
};
use imgcache::config::{default_state_dir, parse_chunk_size, Config, Overrides};
use imgcache::types::{format_size, parse_size};

#[derive(Debug, Parser)]
#[command(
    name = "imgcache",
    version,
    about = "Serve catalog VM images to local VMs over NBD"
)]
struct Cli {
    /// Control socket of the daemon [default: STATE_DIR/control.sock]
    #[arg(long, global = true, env = "IMGCACHE_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// State directory [default: /var/lib/imgcache as root, else $XDG_STATE_HOME/imgcache]
    #[arg(long, global = true, env = "IMGCACHE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (until SIGINT or SIGTERM)
    Serve(ServeArgs),
    /// Manage catalog images
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage copy-on-write volumes (VM disks over images)
    #[command(subcommand)]
    Volume(volume_cmd::VolumeCommand),
    /// Image stores
    #[command(subcommand)]
    Store(StoreCommand),
    /// The chunk cache of remote images
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// List the stores, their kind and location, and whether they answer
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Show the cache's size, counters and per-image residency
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Configuration file (TOML); flags override it
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// NBD TCP listen address, or "off" [default: 127.0.0.1:10809]
    #[arg(long, value_name = "ADDR")]
    nbd_tcp: Option<String>,
    /// NBD unix socket [default: STATE_DIR/nbd.sock]
    #[arg(long, value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// Control API socket [default: STATE_DIR/control.sock]
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace or a tracing directive [default: info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Chunk size of imports that do not choose one [default: 1M]
    #[arg(long, value_name = "SIZE")]
    default_chunk_size: Option<String>,
    /// Mount the FUSE export here, or "off" [default: STATE_DIR/mnt when /dev/fuse works]
    #[arg(long, value_name = "DIR")]
    fuse_mount: Option<String>,
    /// Longest an NBD connection polls for more small requests before sleeping (adaptive),
    /// e.g. "50us", or "off" [default: off]
    #[arg(long, value_name = "DURATION")]
    nbd_busy_poll: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import a raw disk file, or register an image in a store (--store --manifest) or at a
    /// URL (--url) without copying it
    Add(AddArgs),
    /// Make a new image from a volume or one of its snapshots (chunks the volume did not
    /// change are shared with the base image, only changed ones are stored)
    Create(CreateArgs),
    /// Upload a local image's chunks and manifest to a store (chunks already there are skipped)
    Push {
        /// Image name or id
        image: String,
        /// Name of a configured store
        #[arg(long)]
        store: String,
    },
    /// Fetch all of a remote image into the cache
    Warm {
        /// Image name or id
        image: String,
        /// Pin the image first (never evicted)
        #[arg(long)]
        pin: bool,
        /// Bytes per second, e.g. 50M [default: unlimited]
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        rate: Option<u64>,
        /// Chunk fetches in flight [default: the cache's fetch-concurrency]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
        parallel: Option<u16>,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Keep a remote image's cached chunks from eviction
    Pin { image: String },
    /// Let a remote image's cached chunks be evicted again
    Unpin { image: String },
    /// List images
    List {
        /// Include deleted images (the recycle bin)
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one image
    Show {
        /// Image name or id
        image: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Change an image's name or attributes
    Set(SetArgs),
    /// Stop serving an image (it stays in the catalog)
    Disable { image: String },
    /// Serve a disabled image again
    Enable { image: String },
    /// Move an image to the recycle bin
    Delete {
        image: String,
        /// Even if volumes use it: hidden for new volumes, still serving existing ones
        #[arg(long)]
        force: bool,
    },
    /// Restore an image from the recycle bin
    Recover { image: String },
    /// Remove a deleted image for good, freeing its chunks
    Expunge { image: String },
}

/// Attributes shared by `add` and `set`.
#[derive(Debug, Args)]
struct AttrArgs {
    /// Free-form description
    #[arg(long)]
    description: Option<String>,
    /// What the image is for: system or volume
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_enum::<ImageType>)]
    image_type: Option<ImageType>,
    /// raw, qcow2, vmdk or iso
    #[arg(long, value_parser = parse_enum::<DiskFormat>)]
    disk_format: Option<DiskFormat>,
    /// bare or ova
    #[arg(long, value_parser = parse_enum::<ContainerFormat>)]
    container_format: Option<ContainerFormat>,
    /// Architecture, e.g. x86_64 or aarch64
    #[arg(long, value_name = "ARCH", value_parser = parse_arch)]
    arch: Option<String>,
    /// linux, windows, bsd or other
    #[arg(long, value_parser = parse_enum::<OsType>)]
    os_type: Option<OsType>,
    /// bios or uefi
    #[arg(long, value_parser = parse_enum::<Firmware>)]
    firmware: Option<Firmware>,
    /// Whether the guest has virtio drivers: true or false
    #[arg(long, value_name = "BOOL", action = ArgAction::Set, value_parser = clap::value_parser!(bool))]
    virtio: Option<bool>,
    /// Minimum disk size, e.g. 10G
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    min_disk: Option<u64>,
    /// Minimum RAM, e.g. 1G
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    min_ram: Option<u64>,
    /// private, shared or public
    #[arg(long, value_parser = parse_enum::<Visibility>)]
    visibility: Option<Visibility>,
    /// Free-form version label
    #[arg(long)]
    version: Option<String>,
    /// Owner
    #[arg(long)]
    owner: Option<String>,
}

#[derive(Debug, Args)]
struct AddArgs {
    /// Name of the new image
    #[arg(value_parser = parse_name)]
    name: String,
    /// Raw disk file to import (on the daemon's host)
    #[arg(long, value_name = "PATH", required_unless_present_any = ["manifest", "url"], conflicts_with_all = ["manifest", "url"])]
    file: Option<PathBuf>,
    /// Register a native image that lives in this configured store (with --manifest)
    #[arg(long, value_name = "STORE", requires = "manifest")]
    store: Option<String>,
    /// The manifest key of the image in --store (e.g. manifests/UUID, as `image push` prints)
    #[arg(long, value_name = "KEY", requires = "store", conflicts_with = "url")]
    manifest: Option<String>,
    /// Register a raw image object: http(s)://HOST/PATH or s3://BUCKET/KEY
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Chunk size, a power of two from 64K to 16M [default: the daemon's, 1M]
    #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size)]
    chunk_size: Option<u32>,
    /// Expected checksum of the file: md5:HEX or sha256:HEX (recorded unverified for
    /// --manifest and --url images)
    #[arg(long, value_name = "ALGO:HEX", value_parser = parse_checksum)]
    checksum: Option<String>,
    #[command(flatten)]
    attrs: AttrArgs,
    /// Protect the image from deletion
    #[arg(long)]
    protected: bool,
    /// Add a tag (repeatable)
    #[arg(long = "tag", value_name = "TAG", value_parser = parse_tag)]
    tags: Vec<String>,
    /// Set a property (repeatable)
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_property)]
    properties: Vec<(String, String)>,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Name of the new image
    #[arg(value_parser = parse_name)]
    name: String,
    /// The volume to copy, VOLUME or VOLUME@SNAPSHOT
    #[arg(long, value_name = "VOL[@SNAP]")]
    from_volume: String,
    /// Chunk size, a power of two from 64K to 16M [default: the base image's]
    #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size)]
    chunk_size: Option<u32>,
    /// Store to make the image in [default: the base image's store when it can share the
    /// base's chunks there (a native image in a dir or s3 store), else local]
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// Attributes not given are copied from the volume's base image
    #[command(flatten)]
    attrs: AttrArgs,
    /// Protect the image from deletion
    #[arg(long)]
    protected: bool,
    /// Set the tags (repeatable; default: the base image's)
    #[arg(long = "tag", value_name = "TAG", value_parser = parse_tag)]
    tags: Vec<String>,
    /// Set the properties (repeatable; default: the base image's)
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_property)]
    properties: Vec<(String, String)>,
}

#[derive(Debug, Args)]
struct SetArgs {
    /// Image name or id
    image: String,
    /// Rename the image
    #[arg(long = "name", value_name = "NEW", value_parser = parse_name)]
    new_name: Option<String>,
    #[command(flatten)]
    attrs: AttrArgs,
    /// Protect the image from deletion
    #[arg(long, conflicts_with = "unprotected")]
    protected: bool,
    /// Allow deleting the image
    #[arg(long)]
    unprotected: bool,
    /// Set a property (repeatable)
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// Remove a property (repeatable)
    #[arg(long = "remove-property", value_name = "KEY")]
    remove_properties: Vec<String>,
    /// Add a tag (repeatable)
    #[arg(long = "tag", value_name = "TAG", value_parser = parse_tag)]
    tags: Vec<String>,
    /// Remove a tag (repeatable)
    #[arg(long = "remove-tag", value_name = "TAG")]
    remove_tags: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line: `top (cause: cause)`.
fn render_error(e: &anyhow::Error) -> String {
    let mut chain = e.chain().map(|c| c.to_string());
    let top = chain.next().unwrap_or_default();
    let causes: Vec<String> = chain
        .filter(|c| !top.ends_with(c.as_str()))
        .map(|c| strip_os_error(&c).to_string())
        .collect();
    let line = if causes.is_empty() {
        top
    } else {
        format!("{top} ({})", causes.join(": "))
    };
    line.replace('\n', " ")
}

/// `No such file or directory (os error 2)` → `No such file or directory`.
fn strip_os_error(msg: &str) -> &str {
    match msg.rfind(" (os error ") {
        Some(i) if msg.ends_with(')') => &msg[..i],
        _ => msg,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Serve(args) = cli.command {
        return serve(cli.state_dir, args);
    }
    let socket = control_socket(cli.socket, cli.state_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = Client::new(socket);
    rt.block_on(async move {
        match cli.command {
            Command::Serve(_) => unreachable!("handled above"),
            Command::Image(cmd) => image_command(client, cmd).await,
            Command::Volume(cmd) => volume_cmd::run(client, cmd).await,
            Command::Store(StoreCommand::List { json }) => {
                let stores = client.list_stores().await?;
                if json {
                    print_out(&(serde_json::to_string_pretty(&stores)? + "\n"))
                } else {
                    print_out(&format_stores(&stores))
                }
            }
            Command::Cache(CacheCommand::Status { json }) => {
                let view = client.cache_status().await?;
                if json {
                    print_out(&(serde_json::to_string_pretty(&view)? + "\n"))
                } else {
                    print_out(&format_cache(&view))
                }
            }
        }
    })
}

fn serve(state_dir: Option<PathBuf>, args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        state_dir,
        nbd_tcp: args.nbd_tcp,
        nbd_socket: args.nbd_socket,
        control_socket: args.control_socket,
        log_level: args.log_level,
        default_chunk_size: args.default_chunk_size,
        fuse_mount: args.fuse_mount,
        nbd_busy_poll: args.nbd_busy_poll,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&config.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        state_dir = %config.state_dir.display(),
        "imgcache starting"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("imgcache")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(imgcache::daemon::serve::run(config))?;
    Ok(())
}

/// `--socket`, else `STATE_DIR/control.sock` (flag, env or default state directory).
fn control_socket(socket: Option<PathBuf>, state_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(s) = socket {
        return Ok(s);
    }
    let dir = match state_dir {
        Some(d) => d,
        None => default_state_dir()?,
    };
    Ok(dir.join("control.sock"))
}

async fn image_command(client: Client, cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Add(args) => add(&client, args).await,
        ImageCommand::Create(args) => create_from_volume(&client, args).await,
        ImageCommand::List { all, json } => {
            let rows = client.list_images(all).await?;
            if json {
                print_out(&(serde_json::to_string_pretty(&rows)? + "\n"))
            } else {
                print_out(&format_table(&rows))
            }
        }
        ImageCommand::Show { image, json } => {
            let row = client.get_image(&image).await?;
            print_row(&row, json)
        }
        ImageCommand::Set(args) => set(&client, args).await,
        ImageCommand::Disable { image } => action(&client, &image, Lifecycle::Disable).await,
        ImageCommand::Enable { image } => action(&client, &image, Lifecycle::Enable).await,
        ImageCommand::Delete {
            image,
            force: false,
        } => action(&client, &image, Lifecycle::Delete).await,
        ImageCommand::Delete { image, force: true } => {
            let row = client.force_delete_image(&image).await?;
            print_out(&format!("image {} is now {}\n", row.name, row.status))
        }
        ImageCommand::Recover { image } => action(&client, &image, Lifecycle::Recover).await,
        ImageCommand::Push { image, store } => {
            let mut bar = ProgressDisplay::new(std::io::stderr().is_terminal());
            let result = client
                .push_image(&image, &PushRequest { store }, |p| bar.update(p))
                .await;
            bar.finish(result.is_ok());
            let r = result?;
            print_out(&format!(
                "pushed image {image} to store {}\nmanifest: {}\nchunks:   {} ({} uploaded, {} already there)\nuploaded: {}\nregister it elsewhere with: imgcache image add NAME --store STORE --manifest {}\n",
                r.store,
                r.manifest_key,
                r.chunks_total,
                r.chunks_uploaded,
                r.chunks_skipped,
                format_size(r.bytes_uploaded),
                r.manifest_key
            ))
        }
        ImageCommand::Warm {
            image,
            pin,
            rate,
            parallel,
            json,
        } => {
            let req = WarmRequest {
                pin,
                rate,
                parallel: parallel.map(usize::from),
            };
            let mut bar = ProgressDisplay::new(std::io::stderr().is_terminal());
            let started = std::time::Instant::now();
            let result = client.warm_image(&image, &req, |p| bar.update(p)).await;
            bar.finish(result.is_ok());
            let r = result?;
            let secs = started.elapsed().as_secs_f64();
            if json {
                return print_out(&(serde_json::to_string_pretty(&r)? + "\n"));
            }
            print_out(&format!(
                "warmed image {image}{}\nchunks:  {} with data, {} were cached, {} fetched\nfetched: {} in {:.1}s ({}/s)\n",
                if pin { " (pinned)" } else { "" },
                r.data_chunks,
                r.already_cached,
                r.fetched_chunks,
                format_size(r.fetched_bytes),
                secs,
                format_size((r.fetched_bytes as f64 / secs.max(1e-3)) as u64),
            ))
        }
        ImageCommand::Pin { image } => {
            let row = client.image_action(&image, Action::Pin).await?;
            print_out(&format!("image {} is pinned\n", row.name))
        }
        ImageCommand::Unpin { image } => {
            let row = client.image_action(&image, Action::Unpin).await?;
            print_out(&format!("image {} is unpinned\n", row.name))
        }
        ImageCommand::Expunge { image } => {
            let row = client.image_action(&image, Action::Expunge).await?;
            print_out(&format!("expunged image {} ({})\n", row.name, row.id))
        }
    }
}

async fn action(client: &Client, image: &str, action: Lifecycle) -> anyhow::Result<()> {
    let row = client
        .image_action(image, Action::Lifecycle(action))
        .await?;
    print_out(&format!("image {} is now {}\n", row.name, row.status))
}

async fn add(client: &Client, args: AddArgs) -> anyhow::Result<()> {
    let file = match &args.file {
        None => None,
        Some(f) => {
            let file = std::path::absolute(f)
                .with_context(|| format!("invalid file path {}", f.display()))?;
            if let Err(e) = std::fs::metadata(&file) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    bail!("cannot open {}: no such file", file.display());
                }
            }
            Some(file)
        }
    };
    let mut attributes = attributes(args.attrs);
    if args.protected {
        attributes.protected = Some(true);
    }
    if !args.tags.is_empty() {
        attributes.tags = Some(args.tags.into_iter().collect());
    }
    if !args.properties.is_empty() {
        attributes.properties = Some(args.properties.into_iter().collect());
    }
    let req = AddImageRequest {
        name: args.name,
        file,
        store: args.store,
        manifest: args.manifest,
        url: args.url,
        volume: None,
        chunk_size: args.chunk_size.map(u64::from),
        checksum: args.checksum,
        attributes,
    };
    let mut bar = ProgressDisplay::new(std::io::stderr().is_terminal());
    let result = client.add_image(&req, |p| bar.update(p)).await;
    bar.finish(result.is_ok());
    let row = result?;
    let mut out = format!("added image {}\n", row.name);
    out += &format!("id:     {}\n", row.id);
    out += &format!(
        "size:   {} ({} bytes)\n",
        format_size(row.virtual_size),
        row.virtual_size
    );
    out += &format!("md5:    {}\n", row.md5.as_deref().unwrap_or("-"));
    out += &format!("sha256: {}\n", row.sha256.as_deref().unwrap_or("-"));
    if row.store != "local" || row.manifest_key.is_empty() {
        out += &format!("store:  {} (read lazily through the cache)\n", row.store);
    }
    print_out(&out)
}

async fn create_from_volume(client: &Client, args: CreateArgs) -> anyhow::Result<()> {
    let mut attributes = attributes(args.attrs);
    if args.protected {
        attributes.protected = Some(true);
    }
    if !args.tags.is_empty() {
        attributes.tags = Some(args.tags.into_iter().collect());
    }
    if !args.properties.is_empty() {
        attributes.properties = Some(args.properties.into_iter().collect());
    }
    let req = AddImageRequest {
        name: args.name,
        file: None,
        store: args.store,
        manifest: None,
        url: None,
        volume: Some(args.from_volume),
        chunk_size: args.chunk_size.map(u64::from),
        checksum: None,
        attributes,
    };
    let mut bar = ProgressDisplay::new(std::io::stderr().is_terminal());
    let result = client.image_from_volume(&req, |p| bar.update(p)).await;
    bar.finish(result.is_ok());
    let r = result?;
    let row = &r.image;
    let mut out = format!("created image {} from volume {}\n", row.name, r.source);
    out += &format!("id:     {}\n", row.id);
    out += &format!("store:  {}\n", r.store);
    out += &format!(
        "size:   {} ({} bytes)\n",
        format_size(row.virtual_size),
        row.virtual_size
    );
    out += &format!(
        "chunks: {} ({} new, {} shared, {} holes)\n",
        r.chunks_total, r.chunks_new, r.chunks_shared, r.chunks_hole
    );
    out += &format!("md5:    {}\n", row.md5.as_deref().unwrap_or("-"));
    out += &format!("sha256: {}\n", row.sha256.as_deref().unwrap_or("-"));
    if let Some(note) = &r.note {
        out += &format!("note:   {note}\n");
    }
    print_out(&out)
}

async fn set(client: &Client, args: SetArgs) -> anyhow::Result<()> {
    let mut patch = ImagePatch {
        name: args.new_name,
        attributes: attributes(args.attrs),
        add_tags: args.tags,
        remove_tags: args.remove_tags,
        remove_properties: args.remove_properties,
    };
    if args.protected {
        patch.attributes.protected = Some(true);
    } else if args.unprotected {
        patch.attributes.protected = Some(false);
    }
    if !args.properties.is_empty() {
        // Send the whole resulting map, so the result is the same whether the catalog
        // merges or replaces `properties`.
        let current = client.get_image(&args.image).await?;
        let mut props: BTreeMap<String, String> = current.properties;
        for k in &patch.remove_properties {
            props.remove(k);
        }
        props.extend(args.properties);
        patch.attributes.properties = Some(props);
    }
    if patch == ImagePatch::default() {
        bail!("nothing to change: give at least one option (see `imgcache image set --help`)");
    }
    let row = client.update_image(&args.image, &patch).await?;
    print_row(&row, false)
}

fn attributes(a: AttrArgs) -> ImageAttributes {
    ImageAttributes {
        description: a.description,
        image_type: a.image_type,
        disk_format: a.disk_format,
        container_format: a.container_format,
        architecture: a.arch,
        os_type: a.os_type,
        firmware: a.firmware,
        virtio: a.virtio,
        min_disk: a.min_disk,
        min_ram: a.min_ram,
        visibility: a.visibility,
        version: a.version,
        owner: a.owner,
        ..ImageAttributes::default()
    }
}

fn print_row(row: &ImageRecord, json: bool) -> anyhow::Result<()> {
    if json {
        print_out(&(serde_json::to_string_pretty(row)? + "\n"))
    } else {
        print_out(&format_show(row))
    }
}

/// Write to stdout; a closed pipe (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to standard output")
        }
        _ => Ok(()),
    }
}

/// A progress bar on a terminal; nothing otherwise.
struct ProgressDisplay {
    enabled: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressDisplay {
    fn new(enabled: bool) -> ProgressDisplay {
        ProgressDisplay { enabled, bar: None }
    }

    fn update(&mut self, p: AddProgress) {
        if !self.enabled {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(p.total);
            let style = indicatif::ProgressStyle::with_template(
                "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        bar.set_length(p.total);
        bar.set_position(p.done);
    }

    fn finish(&mut self, ok: bool) {
        if let Some(bar) = self.bar.take() {
            if ok {
                bar.finish_and_clear();
            } else {
                bar.abandon();
            }
        }
    }
}

fn format_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Columns separated by two spaces, each as wide as its widest cell; the last not padded.
fn render_table(cells: &[Vec<String>]) -> String {
    let ncol = cells.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..ncol)
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in cells {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < row.len() {
                line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `store list` table.
fn format_stores(stores: &[StoreInfo]) -> String {
    let mut cells = vec![["NAME", "KIND", "LOCATION", "REACHABLE"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
    for s in stores {
        cells.push(vec![
            s.name.clone(),
            s.kind.clone(),
            s.location.clone(),
            match &s.error {
                None => "yes".to_string(),
                Some(e) => format!("no ({e})"),
            },
        ]);
    }
    render_table(&cells)
}

/// The `cache status` summary and per-image table.
fn format_cache(v: &CacheView) -> String {
    let s = &v.status;
    let pct = |a: u64, b: u64| {
        if b == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", a as f64 * 100.0 / b as f64)
        }
    };
    let mut out = String::new();
    out += &format!("dir:       {}\n", s.dir);
    out += &format!(
        "used:      {} of {} ({}; evicts above {:.0}% down to {:.0}%)\n",
        format_size(s.used_bytes),
        format_size(s.max_bytes),
        pct(s.used_bytes, s.max_bytes),
        v.high_watermark * 100.0,
        v.low_watermark * 100.0
    );
    out += &format!(
        "hit ratio: {:.1}% ({} hits, {} misses)\n",
        s.hit_ratio * 100.0,
        s.hits,
        s.misses
    );
    out += &format!("fetched:   {}\n", format_size(s.fetched_bytes));
    out += &format!("corrupt:   {} chunks (re-fetched)\n", s.corrupt_chunks);
    out += &format!(
        "evicted:   {} chunks ({})\n",
        s.evicted_chunks,
        format_size(s.evicted_bytes)
    );
    if v.rows.is_empty() {
        return out;
    }
    out.push('\n');
    let mut cells = vec![["IMAGE", "CACHED", "TOTAL", "%", "PINNED"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
    for r in &v.rows {
        cells.push(vec![
            r.name.clone(),
            format_size(r.cached_bytes),
            r.total_bytes.map_or_else(|| "?".into(), format_size),
            r.total_bytes
                .map_or_else(|| "?".into(), |t| pct(r.cached_bytes, t)),
            if r.pinned { "yes" } else { "no" }.to_string(),
        ]);
    }
    out += &render_table(&cells);
    out
}

/// The `image list` table: a header and one row per image, columns separated by two spaces.
fn format_table(rows: &[ImageRecord]) -> String {
    let header = [
        "NAME",
        "ID",
        "STATUS",
        "SIZE",
        "FORMAT",
        "ARCH",
        "VISIBILITY",
        "PROTECTED",
        "CREATED",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        cells.push(vec![
            r.name.clone(),
            r.id.to_string()[..8].to_string(),
            r.status.to_string(),
            format_size(r.virtual_size),
            r.disk_format.to_string(),
            r.architecture.clone(),
            r.visibility.to_string(),
            if r.protected { "yes" } else { "no" }.to_string(),
            format_time(r.created_at),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            cells
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &cells {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[c] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `image show` lines: `key: value`, keys aligned.
fn format_show(r: &ImageRecord) -> String {
    let size = |n: u64| {
        if n == 0 {
            "-".to_string()
        } else {
            format!("{} ({n} bytes)", format_size(n))
        }
    };
    let mut fields: Vec<(&str, String)> = vec![
        ("id", r.id.to_string()),
        ("name", r.name.clone()),
        ("status", r.status.to_string()),
        ("description", r.description.clone()),
        ("type", r.image_type.to_string()),
        ("disk format", r.disk_format.to_string()),
        ("container format", r.container_format.to_string()),
        ("virtual size", size(r.virtual_size)),
        ("stored size", size(r.stored_size)),
        ("chunk size", format_size(r.chunk_size.into())),
        ("architecture", r.architecture.clone()),
        ("os type", r.os_type.to_string()),
        ("firmware", r.firmware.to_string()),
        ("virtio", r.virtio.to_string()),
        ("min disk", size(r.min_disk)),
        ("min ram", size(r.min_ram)),
        ("visibility", r.visibility.to_string()),
        ("protected", r.protected.to_string()),
        (
            "tags",
            r.tags.iter().cloned().collect::<Vec<_>>().join(", "),
        ),
        ("version", r.version.clone()),
        ("owner", r.owner.clone()),
        ("md5", r.md5.clone().unwrap_or_else(|| "-".into())),
        ("sha256", r.sha256.clone().unwrap_or_else(|| "-".into())),
        ("created", format_time(r.created_at)),
        ("updated", format_time(r.updated_at)),
        ("store", r.store.clone()),
        ("manifest", r.manifest_key.clone()),
    ];
    for (k, v) in &r.properties {
        fields.push(("property", format!("{k}={v}")));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in fields {
        // Multi-line descriptions stay one field: continuation lines are indented.
        let v = v.replace('\n', &format!("\n{}", " ".repeat(width + 1)));
        out.push_str(format!("{:<width$} {v}", format!("{k}:")).trim_end());
        out.push('\n');
    }
    out
}

fn parse_enum<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

fn parse_name(s: &str) -> Result<String, String> {
    validate_name(s).map(|()| s.to_string())
}

fn parse_arch(s: &str) -> Result<String, String> {
    validate_architecture(s).map(|()| s.to_string())
}

fn parse_tag(s: &str) -> Result<String, String> {
    validate_tag(s).map(|()| s.to_string())
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid property {s:?}: expected KEY=VALUE"))?;
    validate_property(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// `md5:HEX` (32 digits) or `sha256:HEX` (64 digits); normalized to lower case.
fn parse_checksum(s: &str) -> Result<String, String> {
    let (algo, hex) = s
        .split_once(':')
        .ok_or_else(|| format!("invalid checksum {s:?}: expected md5:HEX or sha256:HEX"))?;
    let algo = algo.to_ascii_lowercase();
    let digits = match algo.as_str() {
        "md5" => 32,
        "sha256" => 64,
        _ => {
            return Err(format!(
                "invalid checksum {s:?}: the algorithm must be md5 or sha256"
            ))
        }
    };
    if hex.len() != digits || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "invalid checksum {s:?}: {algo} needs {digits} hexadecimal digits"
        ));
    }
    Ok(format!("{algo}:{}", hex.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcache::catalog::ImageStatus;
    use imgcache::types::ImageId;

    fn record(name: &str) -> ImageRecord {
        ImageRecord {
            id: "3f0c8a6e-1b1e-4f7a-9a51-2f0b8e0b5a11"
                .parse::<ImageId>()
                .unwrap(),
            name: name.into(),
            description: String::new(),
            image_type: ImageType::System,
            disk_format: DiskFormat::Raw,
            container_format: ContainerFormat::Bare,
            virtual_size: 10 << 30,
            stored_size: 1 << 30,
            chunk_size: 1 << 20,
            architecture: "x86_64".into(),
            os_type: OsType::Linux,
            firmware: Firmware::Bios,
            virtio: true,
            min_disk: 0,
            min_ram: 0,
            visibility: Visibility::Private,
            protected: false,
            tags: Default::default(),
            properties: Default::default(),
            version: String::new(),
            owner: String::new(),
            status: ImageStatus::Active,
            md5: None,
            sha256: None,
            created_at: 1_700_000_000,
            updated_at: 1_700_000_000,
            store: "local".into(),
            manifest_key: "manifests/x".into(),
            source: Default::default(),
        }
    }

    #[test]
    fn table_has_header_and_aligned_columns() {
        let mut long = record("debian-12-generic");
        long.protected = true;
        long.status = ImageStatus::Disabled;
        let out = format_table(&[record("alpine"), long]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("NAME               ID        STATUS"),
            "{out}"
        );
        assert!(
            lines[1].starts_with("alpine             3f0c8a6e  active"),
            "{out}"
        );
        assert!(lines[2].contains("disabled"), "{out}");
        assert!(lines[2].contains("10.0 GiB"), "{out}");
        assert!(lines[2].ends_with("2023-11-14T22:13:20Z"), "{out}");
        let col = |l: &str, h: &str| l.find(h);
        assert_eq!(col(lines[0], "PROTECTED"), col(lines[2], "yes"));
    }

    #[test]
    fn empty_table_is_just_the_header() {
        assert_eq!(format_table(&[]).lines().count(), 1);
    }

    #[test]
    fn show_lists_key_value_lines() {
        let mut r = record("alpine");
        r.properties.insert("hw_disk_bus".into(), "virtio".into());
        let out = format_show(&r);
        assert!(out.contains("\nname:             alpine\n"), "{out}");
        assert!(
            out.contains("property:         hw_disk_bus=virtio\n"),
            "{out}"
        );
        assert!(out.contains("md5:              -\n"), "{out}");
    }

    #[test]
    fn checksum_is_checked_and_normalized() {
        let md5 = format!("MD5:{}", "AB".repeat(16));
        assert_eq!(
            parse_checksum(&md5).unwrap(),
            format!("md5:{}", "ab".repeat(16))
        );
        assert!(parse_checksum("md5:abc")
            .unwrap_err()
            .contains("32 hexadecimal"));
        assert!(parse_checksum("crc32:00")
            .unwrap_err()
            .contains("md5 or sha256"));
        assert!(parse_checksum("deadbeef").is_err());
    }

    #[test]
    fn property_needs_key_and_value() {
        assert_eq!(
            parse_property("a=b=c").unwrap(),
            ("a".to_string(), "b=c".to_string())
        );
        assert!(parse_property("novalue").is_err());
    }

    #[test]
    fn error_chain_renders_on_one_line() {
        let e = anyhow::Error::from(std::io::Error::other("disk on fire")).context("cannot add");
        assert_eq!(render_error(&e), "cannot add (disk on fire)");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
