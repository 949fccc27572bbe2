//! What the migration that renames the label key `stage` to `ring` must do,
//! on either store: rows written at the schema before it, and the checks
//! each store's test runs after opening such a database.

use std::collections::BTreeMap;

use super::{DeploymentKind, DeploymentState, MetadataStore, NewDeployment};
use crate::selector::Selector;

/// Rows as a hub before the rename stored them, in SQL both stores take.
/// Only `1.0.0` is active, so a new deployment to its target supersedes it.
pub(super) const OLD_ROWS: &str = r#"
    INSERT INTO devices (id, token_sha256, labels, created_at_ms, created_by, hello) VALUES
        ('a', 'ta', '{"site":"x","stage":"production"}', 1, 't',
         '{"device_id":"a","labels":{"stage":"canary","zone":"1"},"hardware":["x86_64"],"agent_version":"0.1.0","running":[],"last_revision":0}'),
        ('b', 'tb', '{"ring":"blue","stage":"old"}', 1, 't', 'not json'),
        ('c', 'tc', '{"Stage":"x","backstage":"y"}', 1, 't', NULL);
    INSERT INTO deployments (model, version, target, kind, state, created_by, created_at_ms, updated_at_ms) VALUES
        ('m', '1.0.0', 'site=a,stage=production', 'deploy', 'active', 't', 1, 1),
        ('m', '2.0.0', 'rack=r1,stage=prod,hardware=aarch64,hardware=cuda', 'deploy', 'superseded', 't', 1, 1),
        ('m', '3.0.0', 'region=eu,stage=p', 'deploy', 'superseded', 't', 1, 1),
        ('m', '4.0.0', 'ring=x,stage=y', 'deploy', 'superseded', 't', 1, 1),
        ('m', '5.0.0', '', 'deploy', 'superseded', 't', 1, 1),
        ('m', '6.0.0', 'backstage=1,site=stage', 'deploy', 'superseded', 't', 1, 1),
        ('m', '7.0.0', 'Stage=x', 'deploy', 'superseded', 't', 1, 1);
"#;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Checks `store`, opened (so migrated) on a database that held [`OLD_ROWS`]
/// at the schema before the rename.
pub(super) fn check(store: &dyn MetadataStore) {
    let devices: BTreeMap<String, _> =
        store.list_devices().expect("devices").into_iter().map(|d| (d.id.clone(), d)).collect();
    let a = &devices["a"];
    assert_eq!(a.labels, labels(&[("ring", "production"), ("site", "x")]));
    let hello = a.hello.as_ref().expect("a's hello");
    assert_eq!(hello["labels"], serde_json::json!({"ring": "canary", "zone": "1"}), "{hello}");
    assert_eq!(hello["hardware"], serde_json::json!(["x86_64"]), "the rest of the hello is kept: {hello}");
    assert_eq!(devices["b"].labels, labels(&[("ring", "blue"), ("stage", "old")]), "a ring already: as it was");
    assert!(devices["b"].hello.is_none(), "a corrupt hello was skipped, and still reads as absent");
    assert_eq!(devices["c"].labels, labels(&[("Stage", "x"), ("backstage", "y")]), "keys are case-sensitive");

    let (all, _) = store.list_deployments(Some("m"), None, 100, 0).expect("deployments");
    let target = |version: &str| all.iter().find(|d| d.version == version).expect(version).target.clone();
    for (version, old, new) in [
        ("1.0.0", "site=a,stage=production", "ring=production,site=a"),
        (
            "2.0.0",
            "rack=r1,stage=prod,hardware=aarch64,hardware=cuda",
            "rack=r1,ring=prod,hardware=aarch64,hardware=cuda",
        ),
        ("3.0.0", "region=eu,stage=p", "region=eu,ring=p"),
    ] {
        assert_eq!(target(version), new, "{old}");
        assert_eq!(target(version), Selector::parse(old).expect("old").to_string(), "printed as a selector is");
    }
    for (version, kept) in
        [("4.0.0", "ring=x,stage=y"), ("5.0.0", ""), ("6.0.0", "backstage=1,site=stage"), ("7.0.0", "Stage=x")]
    {
        assert_eq!(target(version), kept);
    }

    // The rewritten target is the one a deploy to `production,site=a` names
    // now: the new deployment supersedes the migrated one.
    let new = NewDeployment {
        model: "m".into(),
        version: "8.0.0".into(),
        target: Selector::parse("production,site=a").expect("selector").to_string(),
        kind: DeploymentKind::Deploy,
        created_by: "t".into(),
        replaces: None,
        policy: None,
        halt_fraction: 0.2,
        halt_count: None,
        waves: Vec::new(),
    };
    let d = store.insert_deployment(&new, 2).expect("deploy");
    assert_eq!(store.active_deployments("m").expect("active"), [d]);
    let (all, _) = store.list_deployments(Some("m"), None, 100, 0).expect("deployments");
    let old = all.iter().find(|d| d.version == "1.0.0").expect("1.0.0");
    assert_eq!(old.state, DeploymentState::Superseded);
}
