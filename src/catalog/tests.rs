//! Unit tests of the catalog: each opens a fresh database in a temporary directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tempfile::TempDir;

use super::schema::{Schema, META, SCHEMA_VERSION_KEY};
use super::*;
use crate::error::{Classify, ErrorKind};

fn open_temp() -> (TempDir, Catalog) {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(&dir.path().join("catalog.redb")).unwrap();
    (dir, cat)
}

fn db_path(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("catalog.redb")
}

fn add(cat: &Catalog, name: &str) -> ImageRecord {
    cat.insert_importing(
        ImageId::random(),
        name,
        &ImageAttributes::default(),
        "local",
    )
    .unwrap()
}

fn facts(id: ImageId) -> FinishImport {
    FinishImport {
        virtual_size: 10 << 20,
        stored_size: 3 << 20,
        chunk_size: 1 << 20,
        md5: "D41D8CD98F00B204E9800998ECF8427E".into(),
        sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
        manifest_key: format!("manifests/{id}"),
    }
}

fn add_active(cat: &Catalog, name: &str, digests: &[Digest]) -> ImageRecord {
    let rec = add(cat, name);
    cat.finish_import(rec.id, &facts(rec.id), digests).unwrap()
}

fn chunk(n: u8) -> Digest {
    Digest::of(&[n])
}

fn sorted(mut v: Vec<Digest>) -> Vec<Digest> {
    v.sort();
    v
}

fn set_schema_version(path: &Path, version: u64) {
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert(SCHEMA_VERSION_KEY, version)
        .unwrap();
    txn.commit().unwrap();
}

fn schema_version(path: &Path) -> u64 {
    let db = Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    let v = meta.get(SCHEMA_VERSION_KEY).unwrap().unwrap().value();
    v
}

#[test]
fn catalog_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Catalog>();
    check::<CatalogError>();
}

// ---- insert, get, list ----

#[test]
fn insert_fills_in_defaults() {
    let (_dir, cat) = open_temp();
    let id = ImageId::random();

    let rec = cat
        .insert_importing(id, "debian-12", &ImageAttributes::default(), "local")
        .unwrap();

    assert_eq!(rec.id, id);
    assert_eq!(rec.status, ImageStatus::Importing);
    assert_eq!(rec.image_type, ImageType::System);
    assert_eq!(rec.disk_format, DiskFormat::Raw);
    assert_eq!(rec.container_format, ContainerFormat::Bare);
    assert_eq!(rec.architecture, "x86_64");
    assert_eq!(rec.os_type, OsType::Linux);
    assert_eq!(rec.firmware, Firmware::Bios);
    assert!(rec.virtio);
    assert_eq!(rec.visibility, Visibility::Private);
    assert!(!rec.protected);
    assert_eq!(rec.owner, DEFAULT_OWNER);
    assert_eq!(rec.version, "");
    assert_eq!((rec.virtual_size, rec.stored_size), (0, 0));
    assert_eq!((rec.md5.as_deref(), rec.sha256.as_deref()), (None, None));
    assert_eq!(rec.created_at, rec.updated_at);
    assert!(rec.created_at > 0);
    assert_eq!(rec.store, "local");
    assert_eq!(rec.manifest_key, format!("manifests/{id}"));
    assert_eq!(cat.get(&id.to_string()).unwrap(), rec);
}

#[test]
fn insert_applies_given_attributes() {
    let (_dir, cat) = open_temp();
    let attrs = ImageAttributes {
        description: Some("a test image".into()),
        architecture: Some("aarch64".into()),
        firmware: Some(Firmware::Uefi),
        min_disk: Some(u64::MAX),
        tags: Some(BTreeSet::from(["base".to_string()])),
        properties: Some(BTreeMap::from([("hw.cpu".to_string(), "2".to_string())])),
        owner: Some("ops".into()),
        ..Default::default()
    };

    let rec = cat
        .insert_importing(ImageId::random(), "arm", &attrs, "local")
        .unwrap();

    assert_eq!(rec.architecture, "aarch64");
    assert_eq!(rec.firmware, Firmware::Uefi);
    assert_eq!(rec.min_disk, u64::MAX);
    assert!(rec.tags.contains("base"));
    assert_eq!(rec.properties["hw.cpu"], "2");
    assert_eq!(rec.owner, "ops");
}

#[test]
fn invalid_name_error_surfaces() {
    let (_dir, cat) = open_temp();

    let err = cat
        .insert_importing(
            ImageId::random(),
            "a/b",
            &ImageAttributes::default(),
            "local",
        )
        .unwrap_err();

    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("invalid image name"), "{err}");
    assert!(cat.list(true).unwrap().is_empty());
}

#[test]
fn invalid_attributes_are_refused() {
    let (_dir, cat) = open_temp();
    let cases = [
        ImageAttributes {
            architecture: Some("X86-64".into()),
            ..Default::default()
        },
        ImageAttributes {
            tags: Some(BTreeSet::from(["a,b".to_string()])),
            ..Default::default()
        },
        ImageAttributes {
            properties: Some(BTreeMap::from([("bad key".to_string(), String::new())])),
            ..Default::default()
        },
        ImageAttributes {
            description: Some("x".repeat(MAX_DESCRIPTION_LEN + 1)),
            ..Default::default()
        },
        ImageAttributes {
            version: Some("v".repeat(MAX_LABEL_LEN + 1)),
            ..Default::default()
        },
        ImageAttributes {
            owner: Some("o".repeat(MAX_LABEL_LEN + 1)),
            ..Default::default()
        },
    ];

    for attrs in &cases {
        let err = cat
            .insert_importing(ImageId::random(), "img", attrs, "local")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{attrs:?}: {err}");
    }
    assert!(cat.list(true).unwrap().is_empty());
}

#[test]
fn insert_with_taken_name_is_refused() {
    let (_dir, cat) = open_temp();
    add(&cat, "debian");

    let err = cat
        .insert_importing(
            ImageId::random(),
            "debian",
            &ImageAttributes::default(),
            "local",
        )
        .unwrap_err();

    assert!(matches!(err, CatalogError::NameTaken(ref n) if n == "debian"));
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
}

#[test]
fn name_of_deleted_image_stays_taken_until_expunge() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "debian", &[]);
    cat.transition(rec.id, Lifecycle::Delete).unwrap();

    let taken = cat.insert_importing(
        ImageId::random(),
        "debian",
        &ImageAttributes::default(),
        "local",
    );
    cat.expunge(rec.id).unwrap();
    let free = cat.insert_importing(
        ImageId::random(),
        "debian",
        &ImageAttributes::default(),
        "local",
    );

    assert!(matches!(taken, Err(CatalogError::NameTaken(_))));
    assert!(free.is_ok());
    cat.verify().unwrap();
}

#[test]
fn get_finds_by_id_and_by_name() {
    let (_dir, cat) = open_temp();
    let rec = add(&cat, "ubuntu 24.04");

    assert_eq!(cat.get("ubuntu 24.04").unwrap(), rec);
    assert_eq!(cat.get(&rec.id.to_string()).unwrap(), rec);
}

#[test]
fn get_missing_image_names_what_was_looked_up() {
    let (_dir, cat) = open_temp();
    let id = ImageId::random().to_string();

    let by_name = cat.get("nope").unwrap_err();
    let by_id = cat.get(&id).unwrap_err();

    assert_eq!(by_name.kind(), ErrorKind::NotFound);
    assert!(by_name.to_string().contains("\"nope\""), "{by_name}");
    assert!(by_id.to_string().contains(&id), "{by_id}");
}

#[test]
fn list_is_sorted_by_name_and_hides_deleted() {
    let (_dir, cat) = open_temp();
    add_active(&cat, "charlie", &[]);
    let bravo = add_active(&cat, "bravo", &[]);
    add(&cat, "alpha");
    cat.transition(bravo.id, Lifecycle::Delete).unwrap();

    let visible: Vec<String> = cat
        .list(false)
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    let all: Vec<String> = cat
        .list(true)
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();

    assert_eq!(visible, ["alpha", "charlie"]);
    assert_eq!(all, ["alpha", "bravo", "charlie"]);
}

// ---- update ----

#[test]
fn rename_moves_the_name_index() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "old", &[]);
    let patch = ImagePatch {
        name: Some("new".into()),
        ..Default::default()
    };

    let renamed = cat.update(rec.id, &patch).unwrap();

    assert_eq!(renamed.name, "new");
    assert_eq!(cat.get("new").unwrap().id, rec.id);
    assert!(matches!(cat.get("old"), Err(CatalogError::NotFound(_))));
    add(&cat, "old"); // the old name is free again
    cat.verify().unwrap();
}

#[test]
fn rename_to_taken_name_is_refused() {
    let (_dir, cat) = open_temp();
    let a = add_active(&cat, "a", &[]);
    add_active(&cat, "b", &[]);
    let patch = ImagePatch {
        name: Some("b".into()),
        ..Default::default()
    };

    let err = cat.update(a.id, &patch).unwrap_err();

    assert!(matches!(err, CatalogError::NameTaken(ref n) if n == "b"));
    assert_eq!(cat.get("a").unwrap().id, a.id);
    cat.verify().unwrap();
}

#[test]
fn rename_to_invalid_name_is_refused() {
    let (_dir, cat) = open_temp();
    let a = add_active(&cat, "a", &[]);
    let patch = ImagePatch {
        name: Some(" padded".into()),
        ..Default::default()
    };

    let err = cat.update(a.id, &patch).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn update_edits_tags_and_properties() {
    let (_dir, cat) = open_temp();
    let attrs = ImageAttributes {
        tags: Some(BTreeSet::from(["keep".to_string(), "drop".to_string()])),
        properties: Some(BTreeMap::from([
            ("k1".to_string(), "v1".to_string()),
            ("k2".to_string(), "v2".to_string()),
        ])),
        ..Default::default()
    };
    let rec = cat
        .insert_importing(ImageId::random(), "img", &attrs, "local")
        .unwrap();
    let patch = ImagePatch {
        attributes: ImageAttributes {
            properties: Some(BTreeMap::from([("k3".to_string(), "v3".to_string())])),
            protected: Some(true),
            ..Default::default()
        },
        add_tags: vec!["new".into()],
        remove_tags: vec!["drop".into()],
        remove_properties: vec!["k1".into()],
        ..Default::default()
    };

    let out = cat.update(rec.id, &patch).unwrap();

    assert_eq!(
        out.tags,
        BTreeSet::from(["keep".to_string(), "new".to_string()])
    );
    assert_eq!(
        out.properties.keys().collect::<Vec<_>>(),
        ["k2", "k3"].iter().collect::<Vec<_>>()
    );
    assert!(out.protected);
    assert!(out.updated_at >= rec.updated_at);
    assert_eq!(cat.get("img").unwrap(), out);
}

#[test]
fn update_with_invalid_tag_changes_nothing() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "img", &[]);
    let patch = ImagePatch {
        name: Some("renamed".into()),
        add_tags: vec![String::new()],
        ..Default::default()
    };

    let err = cat.update(rec.id, &patch).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(cat.get("img").unwrap(), rec);
    cat.verify().unwrap();
}

#[test]
fn deleted_image_accepts_only_a_description() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "img", &[]);
    cat.transition(rec.id, Lifecycle::Delete).unwrap();
    let describe = ImagePatch {
        attributes: ImageAttributes {
            description: Some("why it was deleted".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let retag = ImagePatch {
        add_tags: vec!["x".into()],
        ..Default::default()
    };

    let described = cat.update(rec.id, &describe).unwrap();
    let err = cat.update(rec.id, &retag).unwrap_err();

    assert_eq!(described.description, "why it was deleted");
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("recycle bin"), "{err}");
}

// ---- lifecycle ----

fn record_in(status: ImageStatus, protected: bool) -> ImageRecord {
    let (_dir, cat) = open_temp();
    let mut rec = add(&cat, "img");
    rec.status = status;
    rec.protected = protected;
    rec
}

#[test]
fn lifecycle_transition_table() {
    use ImageStatus as S;
    use Lifecycle as L;
    // (from, action, expected: Some(plan) or None for a Conflict)
    let table = [
        (S::Active, L::Disable, Some(Plan::To(S::Disabled))),
        (S::Disabled, L::Disable, Some(Plan::NoOp)),
        (S::Importing, L::Disable, None),
        (S::Queued, L::Disable, None),
        (S::Error, L::Disable, None),
        (S::Deleted, L::Disable, None),
        (S::Disabled, L::Enable, Some(Plan::To(S::Active))),
        (S::Active, L::Enable, Some(Plan::NoOp)),
        (S::Importing, L::Enable, None),
        (S::Queued, L::Enable, None),
        (S::Error, L::Enable, None),
        (S::Deleted, L::Enable, None),
        (S::Active, L::Delete, Some(Plan::To(S::Deleted))),
        (S::Disabled, L::Delete, Some(Plan::To(S::Deleted))),
        (S::Error, L::Delete, Some(Plan::To(S::Deleted))),
        (S::Deleted, L::Delete, Some(Plan::NoOp)),
        (S::Importing, L::Delete, None),
        (S::Queued, L::Delete, None),
        (S::Deleted, L::Recover, Some(Plan::To(S::Disabled))),
        (S::Active, L::Recover, None),
        (S::Disabled, L::Recover, None),
        (S::Error, L::Recover, None),
        (S::Importing, L::Recover, None),
        (S::Queued, L::Recover, None),
    ];

    for (from, action, expected) in table {
        let rec = record_in(from, false);
        let got = plan_transition(&rec, action, Some(S::Disabled));
        match expected {
            Some(plan) => assert_eq!(got.unwrap(), plan, "{from} {action:?}"),
            None => {
                let err = got.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Conflict, "{from} {action:?}");
                assert!(
                    err.to_string().contains(from.as_str()),
                    "message names the current status: {err}"
                );
            }
        }
    }
}

#[test]
fn disable_and_enable_round_trip() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "img", &[]);

    let disabled = cat.transition(rec.id, Lifecycle::Disable).unwrap();
    let enabled = cat.transition(rec.id, Lifecycle::Enable).unwrap();

    assert_eq!(disabled.status, ImageStatus::Disabled);
    assert_eq!(enabled.status, ImageStatus::Active);
    assert_eq!(cat.get("img").unwrap().status, ImageStatus::Active);
}

#[test]
fn repeated_disable_is_a_no_op() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "img", &[]);
    let first = cat.transition(rec.id, Lifecycle::Disable).unwrap();

    let second = cat.transition(rec.id, Lifecycle::Disable).unwrap();

    assert_eq!(second, first);
}

#[test]
fn enabling_a_deleted_image_is_refused() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "img", &[]);
    cat.transition(rec.id, Lifecycle::Delete).unwrap();

    let err = cat.transition(rec.id, Lifecycle::Enable).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("recover it first"), "{err}");
}

#[test]
fn deleting_an_importing_image_is_refused() {
    let (_dir, cat) = open_temp();
    let rec = add(&cat, "img");

    let err = cat.transition(rec.id, Lifecycle::Delete).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(cat.get("img").unwrap().status, ImageStatus::Importing);
}

#[test]
fn delete_protected_image_is_refused() {
    let (_dir, cat) = open_temp();
    let attrs = ImageAttributes {
        protected: Some(true),
        ..Default::default()
    };
    let rec = cat
        .insert_importing(ImageId::random(), "golden", &attrs, "local")
        .unwrap();
    cat.finish_import(rec.id, &facts(rec.id), &[]).unwrap();

    let err = cat.transition(rec.id, Lifecycle::Delete).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(
        err.to_string(),
        "image golden is protected; unprotect it first with `imgcache image set golden --unprotected`"
    );
    assert_eq!(cat.get("golden").unwrap().status, ImageStatus::Active);
}

#[test]
fn protected_hint_quotes_a_name_with_spaces() {
    let rec = record_in(ImageStatus::Active, true);
    let mut rec = rec;
    rec.name = "my image".into();

    let err = plan_transition(&rec, Lifecycle::Delete, None).unwrap_err();

    assert!(
        err.to_string()
            .contains("`imgcache image set 'my image' --unprotected`"),
        "{err}"
    );
}

#[test]
fn recover_restores_prior_status() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "img", &[]);
    cat.transition(rec.id, Lifecycle::Disable).unwrap();
    let deleted = cat.transition(rec.id, Lifecycle::Delete).unwrap();

    let recovered = cat.transition(rec.id, Lifecycle::Recover).unwrap();

    assert_eq!(deleted.status, ImageStatus::Deleted);
    assert_eq!(recovered.status, ImageStatus::Disabled);
    cat.verify().unwrap();
}

#[test]
fn recover_of_image_not_in_recycle_bin_is_refused() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "img", &[]);

    let err = cat.transition(rec.id, Lifecycle::Recover).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("not in the recycle bin"), "{err}");
}

#[test]
fn transition_of_missing_image_is_not_found() {
    let (_dir, cat) = open_temp();

    let err = cat
        .transition(ImageId::random(), Lifecycle::Disable)
        .unwrap_err();

    assert_eq!(err.kind(), ErrorKind::NotFound);
}

// ---- imports, chunk references, expunge ----

#[test]
fn finish_import_sets_facts_and_references() {
    let (_dir, cat) = open_temp();
    let rec = add(&cat, "img");

    let done = cat
        .finish_import(rec.id, &facts(rec.id), &[chunk(1), chunk(2)])
        .unwrap();

    assert_eq!(done.status, ImageStatus::Active);
    assert_eq!(done.virtual_size, 10 << 20);
    assert_eq!(done.chunk_size, 1 << 20);
    assert_eq!(
        done.md5.as_deref(),
        Some("d41d8cd98f00b204e9800998ecf8427e")
    );
    assert!(cat.is_referenced(&chunk(1)));
    assert!(!cat.is_referenced(&chunk(3)));
    assert_eq!(
        sorted(cat.chunks_of(rec.id).unwrap()),
        sorted(vec![chunk(1), chunk(2)])
    );
    cat.verify().unwrap();
}

#[test]
fn finish_import_of_active_image_is_refused() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "img", &[chunk(1)]);

    let err = cat
        .finish_import(rec.id, &facts(rec.id), &[chunk(1)])
        .unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(cat.chunk_ref_count(&chunk(1)).unwrap(), 1);
}

#[test]
fn finish_import_counts_a_repeated_digest_once() {
    let (_dir, cat) = open_temp();

    add_active(&cat, "img", &[chunk(1), chunk(1)]);

    assert_eq!(cat.chunk_ref_count(&chunk(1)).unwrap(), 1);
    cat.verify().unwrap();
}

#[test]
fn remove_failed_import_frees_the_name() {
    let (_dir, cat) = open_temp();
    let rec = add(&cat, "img");

    cat.remove_failed_import(rec.id).unwrap();
    cat.remove_failed_import(rec.id).unwrap(); // a missing row is fine

    assert!(matches!(cat.get("img"), Err(CatalogError::NotFound(_))));
    add(&cat, "img");
    cat.verify().unwrap();
}

#[test]
fn remove_failed_import_refuses_a_committed_image() {
    let (_dir, cat) = open_temp();
    let rec = add_active(&cat, "img", &[chunk(1)]);

    let err = cat.remove_failed_import(rec.id).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(cat.is_referenced(&chunk(1)));
}

#[test]
fn expunge_returns_exactly_the_digests_no_other_image_uses() {
    let (_dir, cat) = open_temp();
    let a = add_active(&cat, "a", &[chunk(1), chunk(2), chunk(3)]);
    let b = add_active(&cat, "b", &[chunk(2), chunk(3), chunk(4)]);
    cat.transition(a.id, Lifecycle::Delete).unwrap();

    let (row, freed) = cat.expunge(a.id).unwrap();

    assert_eq!(row.id, a.id);
    assert_eq!(freed, vec![chunk(1)]);
    assert!(!cat.is_referenced(&chunk(1)));
    assert_eq!(cat.chunk_ref_count(&chunk(2)).unwrap(), 1);
    assert_eq!(
        cat.referenced_chunks().unwrap(),
        HashSet::from([chunk(2), chunk(3), chunk(4)])
    );
    cat.verify().unwrap();

    cat.transition(b.id, Lifecycle::Delete).unwrap();
    let (_, freed) = cat.expunge(b.id).unwrap();

    assert_eq!(sorted(freed), sorted(vec![chunk(2), chunk(3), chunk(4)]));
    assert!(cat.referenced_chunks().unwrap().is_empty());
    cat.verify().unwrap();
}

#[test]
fn chunks_of_a_deleted_image_stay_referenced_until_expunge() {
    let (_dir, cat) = open_temp();
    let a = add_active(&cat, "a", &[chunk(1)]);

    cat.transition(a.id, Lifecycle::Delete).unwrap();

    assert!(cat.is_referenced(&chunk(1)));
    assert!(cat
        .referenced_manifests()
        .unwrap()
        .contains(&a.manifest_key));
}

#[test]
fn expunge_of_image_not_in_recycle_bin_is_refused() {
    let (_dir, cat) = open_temp();
    let a = add_active(&cat, "a", &[chunk(1)]);

    let err = cat.expunge(a.id).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(
        err.to_string()
            .contains("not in the recycle bin (status active); delete it first"),
        "{err}"
    );
    assert!(cat.is_referenced(&chunk(1)));
}

#[test]
fn referenced_manifests_include_every_status() {
    let (_dir, cat) = open_temp();
    let importing = add(&cat, "importing");
    let active = add_active(&cat, "active", &[]);

    let keys = cat.referenced_manifests().unwrap();

    assert_eq!(
        keys,
        HashSet::from([importing.manifest_key, active.manifest_key])
    );
}

// ---- durability, crash recovery, schema ----

#[test]
fn refs_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (a, b) = {
        let cat = Catalog::open(&path).unwrap();
        let a = add_active(&cat, "a", &[chunk(1), chunk(2)]);
        let b = add_active(&cat, "b", &[chunk(2)]);
        cat.transition(b.id, Lifecycle::Disable).unwrap();
        cat.transition(b.id, Lifecycle::Delete).unwrap();
        (a, b)
    };

    let cat = Catalog::open(&path).unwrap();

    assert_eq!(cat.chunk_ref_count(&chunk(1)).unwrap(), 1);
    assert_eq!(cat.chunk_ref_count(&chunk(2)).unwrap(), 2);
    assert_eq!(cat.get("a").unwrap().id, a.id);
    assert_eq!(
        cat.transition(b.id, Lifecycle::Recover).unwrap().status,
        ImageStatus::Disabled
    );
    cat.verify().unwrap();
}

#[test]
fn importing_rows_are_found_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let unfinished = {
        let cat = Catalog::open(&path).unwrap();
        add_active(&cat, "done", &[chunk(1)]);
        add(&cat, "unfinished")
        // dropped without finish_import: the daemon died mid-import
    };

    let cat = Catalog::open(&path).unwrap();
    let rows = cat.importing_rows().unwrap();

    assert_eq!(rows, vec![unfinished.clone()]);
    cat.remove_failed_import(unfinished.id).unwrap();
    assert!(cat.importing_rows().unwrap().is_empty());
    cat.verify().unwrap();
}

#[test]
fn new_catalog_has_current_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);

    drop(Catalog::open(&path).unwrap());

    assert_eq!(schema_version(&path), SCHEMA_VERSION);
    Catalog::open(&path).unwrap(); // and opens again
}

#[test]
fn newer_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    drop(Catalog::open(&path).unwrap());
    set_schema_version(&path, SCHEMA_VERSION + 1);

    let err = Catalog::open(&path).err().unwrap();

    assert!(
        matches!(err, CatalogError::SchemaTooNew { found, supported }
            if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err}"
    );
    assert!(err.to_string().contains("newer"), "{err}");
    assert_eq!(schema_version(&path), SCHEMA_VERSION + 1, "left untouched");
}

const MARKS: TableDefinition<&str, u64> = TableDefinition::new("test_marks");

/// A fake step 1 → 2: counts its runs and rewrites every image's owner.
fn fake_step_1_to_2(txn: &WriteTransaction) -> Result<(), CatalogError> {
    let mut marks = txn.open_table(MARKS).unwrap();
    let runs = marks.get("runs").unwrap().map(|v| v.value()).unwrap_or(0);
    marks.insert("runs", runs + 1).unwrap();
    let mut images = txn.open_table(super::schema::IMAGES).unwrap();
    let rows = super::schema::read_all_rows(&images)?;
    for mut rec in rows {
        rec.owner = "migrated".into();
        images
            .insert(
                super::schema::id_key(rec.id),
                super::schema::encode_record(&rec).as_slice(),
            )
            .unwrap();
    }
    Ok(())
}

/// The real steps, then the fake one to a version past the current.
const FAKE_NEXT: Schema = Schema {
    version: SCHEMA_VERSION + 1,
    migrations: &[super::volumes::migrate_v1_to_v2, fake_step_1_to_2],
};
const V1: Schema = Schema {
    version: 1,
    migrations: &[],
};

fn migration_runs(path: &Path) -> u64 {
    let db = Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let marks = txn.open_table(MARKS).unwrap();
    let v = marks.get("runs").unwrap().unwrap().value();
    v
}

#[test]
fn older_schema_version_is_migrated_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let cat = Catalog::open_with(&path, V1).unwrap();
        add_active(&cat, "img", &[]);
    }

    let cat = Catalog::open_with(&path, FAKE_NEXT).unwrap();
    assert_eq!(cat.get("img").unwrap().owner, "migrated");
    drop(cat);
    drop(Catalog::open_with(&path, FAKE_NEXT).unwrap());

    assert_eq!(schema_version(&path), SCHEMA_VERSION + 1);
    assert_eq!(migration_runs(&path), 1);
    // and the current build now refuses the file
    assert!(matches!(
        Catalog::open(&path),
        Err(CatalogError::SchemaTooNew { found, supported })
            if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION
    ));
}

fn failing_step(_txn: &WriteTransaction) -> Result<(), CatalogError> {
    Err(CatalogError::corrupt("fake migration failure"))
}

#[test]
fn failed_migration_leaves_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    drop(Catalog::open_with(&path, V1).unwrap());
    let failing = Schema {
        version: 2,
        migrations: &[failing_step],
    };

    let err = Catalog::open_with(&path, failing).err().unwrap();

    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!(schema_version(&path), 1);
}

#[test]
fn foreign_redb_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(MARKS).unwrap().insert("x", 1).unwrap();
        txn.commit().unwrap();
    }

    let err = Catalog::open(&path).err().unwrap();

    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("imgcache catalog"), "{err}");
}

#[test]
fn file_that_is_not_a_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    std::fs::write(&path, b"this is not a redb file at all, just some text").unwrap();

    let err = Catalog::open(&path).err().unwrap();

    assert!(matches!(err, CatalogError::Open { .. }), "{err}");
}

// ---- concurrency ----

#[test]
fn concurrent_writers_keep_the_tables_consistent() {
    let (_dir, cat) = open_temp();
    let cat = std::sync::Arc::new(cat);
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let cat = cat.clone();
            std::thread::spawn(move || {
                for i in 0..10u8 {
                    let rec = add(&cat, &format!("img-{t}-{i}"));
                    cat.finish_import(rec.id, &facts(rec.id), &[chunk(i), chunk(100 + t)])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    assert_eq!(cat.list(false).unwrap().len(), 80);
    assert_eq!(cat.chunk_ref_count(&chunk(0)).unwrap(), 8);
    assert_eq!(cat.chunk_ref_count(&chunk(100)).unwrap(), 10);
    cat.verify().unwrap();
}

// ---- model test ----

mod model_test {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8, Vec<u8>),
        Delete(u8),
        Recover(u8),
        Expunge(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6u8, proptest::collection::vec(0..12u8, 0..6)).prop_map(|(n, c)| Op::Add(n, c)),
            (0..6u8).prop_map(Op::Delete),
            (0..6u8).prop_map(Op::Recover),
            (0..6u8).prop_map(Op::Expunge),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Chunk references always equal the union of the chunks of every image not expunged,
        /// and expunge frees exactly the chunks no remaining image uses.
        #[test]
        fn chunk_refs_match_a_plain_model(ops in proptest::collection::vec(op(), 1..40)) {
            let (_dir, cat) = open_temp();
            // name slot -> (id, deleted, chunks)
            let mut model: HashMap<u8, (ImageId, bool, HashSet<Digest>)> = HashMap::new();
            for op in ops {
                match op {
                    Op::Add(n, cs) => {
                        let digests: Vec<Digest> = cs.iter().map(|&c| chunk(c)).collect();
                        let rec = cat.insert_importing(
                            ImageId::random(), &format!("img{n}"), &ImageAttributes::default(), "local");
                        if model.contains_key(&n) {
                            prop_assert!(matches!(rec, Err(CatalogError::NameTaken(_))));
                            continue;
                        }
                        let rec = rec.unwrap();
                        cat.finish_import(rec.id, &facts(rec.id), &digests).unwrap();
                        model.insert(n, (rec.id, false, digests.into_iter().collect()));
                    }
                    Op::Delete(n) => if let Some((id, deleted, _)) = model.get_mut(&n) {
                        cat.transition(*id, Lifecycle::Delete).unwrap();
                        *deleted = true;
                    },
                    Op::Recover(n) => if let Some((id, deleted, _)) = model.get_mut(&n) {
                        let res = cat.transition(*id, Lifecycle::Recover);
                        prop_assert_eq!(res.is_ok(), *deleted);
                        *deleted = false;
                    },
                    Op::Expunge(n) => if let Some((id, deleted, chunks)) = model.get(&n).cloned() {
                        let res = cat.expunge(id);
                        prop_assert_eq!(res.is_ok(), deleted);
                        if deleted {
                            model.remove(&n);
                            let still: HashSet<Digest> =
                                model.values().flat_map(|(_, _, c)| c.iter().copied()).collect();
                            let expected: HashSet<Digest> = chunks.difference(&still).copied().collect();
                            let freed: HashSet<Digest> = res.unwrap().1.into_iter().collect();
                            prop_assert_eq!(freed, expected);
                        }
                    },
                }
                let all: HashSet<Digest> =
                    model.values().flat_map(|(_, _, c)| c.iter().copied()).collect();
                prop_assert_eq!(cat.referenced_chunks().unwrap(), all);
            }
            cat.verify().unwrap();
        }
    }
}

// ---- images registered in place (remote stores, raw objects) ----

#[test]
fn row_written_before_source_existed_loads_as_native() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let id = {
        let cat = Catalog::open(&path).unwrap();
        add_active(&cat, "old", &[chunk(1)]).id
    };
    {
        // Rewrite the row the way an earlier build stored it: no `source` key.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut images = txn.open_table(super::schema::IMAGES).unwrap();
            let key = super::schema::id_key(id);
            let mut v: serde_json::Value =
                serde_json::from_slice(images.get(key).unwrap().unwrap().value()).unwrap();
            v.as_object_mut().unwrap().remove("source").unwrap();
            images
                .insert(key, serde_json::to_vec(&v).unwrap().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }

    let cat = Catalog::open(&path).unwrap();

    assert_eq!(cat.get("old").unwrap().source, ImageSource::Native);
}

#[test]
fn registered_object_image_is_active_and_references_no_chunks() {
    let (_dir, cat) = open_temp();
    let rec = cat
        .insert_importing(ImageId::random(), "web", &ImageAttributes::default(), "url")
        .unwrap();
    let facts = FinishRegister {
        virtual_size: 5 << 20,
        stored_size: 0,
        chunk_size: 1 << 20,
        md5: None,
        sha256: Some("AB".repeat(32)),
        manifest_key: "disk.raw".into(),
        source: ImageSource::Object {
            url: "http://127.0.0.1:1/disk.raw".into(),
        },
    };

    let row = cat.finish_register(rec.id, &facts).unwrap();

    assert_eq!(row.status, ImageStatus::Active);
    assert_eq!(row.sha256, Some("ab".repeat(32)));
    assert_eq!(row.md5, None);
    assert_eq!(cat.get("web").unwrap().source, facts.source);
    assert!(cat.chunks_of(rec.id).unwrap().is_empty());
    cat.verify().unwrap();
}

#[test]
fn finishing_a_registration_twice_is_a_conflict() {
    let (_dir, cat) = open_temp();
    let rec = add(&cat, "twice");
    let facts = FinishRegister {
        virtual_size: 1 << 20,
        stored_size: 0,
        chunk_size: 1 << 20,
        md5: None,
        sha256: None,
        manifest_key: "manifests/x".into(),
        source: ImageSource::Native,
    };
    cat.finish_register(rec.id, &facts).unwrap();

    let err = cat.finish_register(rec.id, &facts).unwrap_err();

    assert_eq!(err.kind(), ErrorKind::Conflict);
}
