use super::*;

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
const D: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";

/// Stages, validates and promotes `version` in `s`, and commits it.
fn promote(store: &Store, s: &mut Slots, version: &str, sha: &str, deployment: i64) {
    let c = s.stage(version, sha).expect("stage");
    s.begin_validation(c).expect("validate");
    s.promote(c).expect("promote");
    store.activate(s, deployment).expect("activate");
}

#[test]
fn activation_moves_the_old_version_to_standby_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let mut s = Slots::new("m");
    promote(&store, &mut s, "1.0.0", A, 1);
    promote(&store, &mut s, "2.0.0", B, 2);
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    let m = store.model("m").expect("read").expect("present");
    assert_eq!((m.active_version.as_deref(), m.standby_version.as_deref()), (Some("2.0.0"), Some("1.0.0")));
    assert_eq!((m.status, m.active_deployment), (ModelStatus::Serving, Some(2)));
    // The row and the slot pair were written together.
    let pair = store.load_slots("m").expect("load").expect("present");
    assert_eq!(pair, s);
    // A rollback is committed the same way: the standby is active again.
    s.rollback("accuracy").expect("rollback");
    store.activate(&s, 1).expect("commit rollback");
    let m = store.model("m").expect("read").expect("present");
    assert_eq!((m.active_sha256.as_deref(), m.standby_sha256), (Some(A), None));
}

#[test]
fn gc_keeps_active_standby_what_is_wanted_and_one_more() {
    const E: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let t0 = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    for (i, sha) in [A, B, C, D, E].into_iter().enumerate() {
        let f = std::fs::File::create(store.model_path(sha)).expect("create");
        // Distinct write times, E newest.
        f.set_modified(t0 + std::time::Duration::from_secs(i as u64)).expect("mtime");
    }
    let mut s = Slots::new("m");
    promote(&store, &mut s, "1", A, 1);
    promote(&store, &mut s, "2", B, 2);
    let removed = store.gc(&[C.to_owned()].into()).expect("gc");
    assert_eq!(removed, [D], "E is the newest of the rest and stays as the one more");
    assert!(store.has_model(A) && store.has_model(B) && store.has_model(C) && store.has_model(E));
}

#[test]
fn partial_downloads_do_not_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let partial = store.models_dir().join(format!(".partial-{A}"));
    std::fs::write(&partial, b"half").expect("write");
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    assert!(!partial.exists());
    assert!(!store.has_model(A));
}

#[test]
fn committed_slots_come_back_after_a_restart_and_uncommitted_changes_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let mut s = Slots::new("m");
    let b = s.stage("1.0.0", A).expect("stage");
    s.begin_validation(b).expect("v");
    s.promote(b).expect("p");
    store.commit_slots(&s).expect("commit");
    // A transition that is never committed (power lost before the commit).
    s.stage("2.0.0", B).expect("stage v2");
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    let back = store.load_slots("m").expect("load").expect("present");
    assert_eq!(back.active(), Some(Color::Blue));
    assert_eq!(back.get(Color::Blue).version.as_deref(), Some("1.0.0"));
    assert_eq!(back.get(Color::Green).state, SlotState::Empty);
}

#[test]
fn events_are_marked_once_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store.event(EventKind::StateRefused, "", "", "replayed").expect("e1");
    store.event(EventKind::ModelInstalled, "m", "1", "").expect("e2");
    let pending = store.unreported_events(10).expect("list");
    assert_eq!(pending.len(), 2);
    store.mark_reported(pending[0].id).expect("mark");
    assert_eq!(store.unreported_events(10).expect("list").len(), 1);
}

#[test]
fn a_stored_word_that_does_not_parse_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store.set_status("m", ModelStatus::Downloading, "1", "").expect("status");
    store.event(EventKind::DownloadStarted, "m", "1", "").expect("event");
    store.conn().execute_batch("UPDATE models SET status = 'bogus'; UPDATE events SET kind = 'odd'").expect("corrupt");
    let e = store.models().expect_err("an unknown status");
    assert!(crate::util::error_chain(&e).contains("unknown model status `bogus`"), "{e}");
    let e = store.recent_events(1).expect_err("an unknown kind");
    assert!(crate::util::error_chain(&e).contains("unknown event kind `odd`"), "{e}");
}

#[test]
fn a_corrupt_slots_row_or_manifest_is_an_error_not_absent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let mut s = Slots::new("m");
    promote(&store, &mut s, "1", A, 1);
    store.conn().execute("INSERT INTO manifests (sha256, signed) VALUES (?1, x'ff')", [B]).expect("insert");
    store.conn().execute_batch("UPDATE slots SET pair = '{\"model\": 3'").expect("corrupt");
    let e = store.load_slots("m").expect_err("a corrupt slots row");
    assert!(crate::util::error_chain(&e).contains("corrupt slots row for `m`"), "{e}");
    let e = store.manifest(B).expect_err("a corrupt manifest");
    assert!(crate::util::error_chain(&e).contains(&format!("corrupt signed manifest for `{B}`")), "{e}");
    // Absent is still absent.
    assert_eq!(store.load_slots("other").expect("load"), None);
    assert_eq!(store.manifest(C).expect("read"), None);
}
