//! The signed desired state a hub streams to a device, verified then decoded
//! exactly as the agent's subscription does (`agent/src/sync.rs` calls
//! `sentinel_proto::verify_state`): signature, device, replay, expiry, and
//! every manifest inside.
//!
//! Input: a `HubMessage` as it arrives on the gRPC stream, and also the
//! `DesiredState` payload a hub would sign. For the latter the harness signs
//! the payload as is, then once more with every manifest inside signed too,
//! so each check behind a signature is reached.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use sentinel_agent::error_chain;
use sentinel_agent::rollout::policy::{default_policy, policy_from};
use sentinel_fuzz::{DEVICE_ID, LAST_REVISION, NOW_UNIX_MS};
use sentinel_proto::manifest::MANIFEST_CONTEXT;
use sentinel_proto::pb::{DesiredState, HubMessage, SignedDesiredState, hub_message};
use sentinel_proto::state::STATE_CONTEXT;
use sentinel_proto::{StateError, VerifiedState, sign_state, verify_state};

fn check(signed: &SignedDesiredState) -> Result<VerifiedState, StateError> {
    let keys = sentinel_fuzz::keys();
    let result = verify_state(signed, &keys.trusted, DEVICE_ID, LAST_REVISION, NOW_UNIX_MS);
    match &result {
        Ok(v) => {
            assert_eq!(v.manifests.len(), v.state.models.len(), "one manifest per model");
            assert!(v.state.revision >= LAST_REVISION, "no replay gets through");
            assert!(v.state.expires_at_unix_ms > NOW_UNIX_MS, "no expired state gets through");
            assert_eq!(v.state.device_id, DEVICE_ID, "no other device's state gets through");
            // The agent turns each assignment's policy into its own next (agent.rs).
            let defaults = default_policy();
            for assignment in &v.state.models {
                let _ = policy_from(assignment.policy.as_ref(), &defaults);
            }
        }
        Err(e) => {
            // What the agent logs and reports for a refusal.
            let _ = (e.kind(), error_chain(e));
        }
    }
    result
}

fuzz_target!(|data: &[u8]| {
    let keys = sentinel_fuzz::keys();
    // As received on the stream.
    if let Ok(HubMessage { kind: Some(hub_message::Kind::State(signed)) }) = HubMessage::decode(data) {
        let _ = check(&signed);
    }
    // As if the hub had signed these bytes.
    let key_id = keys.signer.key_id().to_owned();
    let _ = check(&SignedDesiredState {
        state: data.to_vec(),
        signature: keys.signer.sign(STATE_CONTEXT, data),
        key_id: key_id.clone(),
    });
    // And with each manifest inside signed as well.
    if let Ok(mut state) = DesiredState::decode(data)
        && !state.models.is_empty()
    {
        for assignment in &mut state.models {
            if let Some(m) = assignment.manifest.as_mut() {
                m.signature = keys.signer.sign(MANIFEST_CONTEXT, &m.manifest);
                m.key_id = key_id.clone();
            }
        }
        let _ = check(&sign_state(&keys.signer, &state));
    }
});
