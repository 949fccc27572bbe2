//! The words the store records: a model's status and an event's kind.
//!
//! Their text is what SQLite holds, what `sentinel-agent status` and
//! `models` show and what the hub receives, so [`ModelStatus::as_str`] and
//! [`EventKind::as_str`] must never change for an existing variant. A stored
//! word that does not parse is an error ([`UnknownWord`]), never a default.

use std::fmt;
use std::str::FromStr;

/// A stored word that names no variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{found}`")]
pub struct UnknownWord {
    /// What the word should have been: "model status" or "event kind".
    pub what: &'static str,
    pub found: String,
}

/// Declares a word enum with `as_str`, `FromStr`, `Display` and `ALL`.
macro_rules! words {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every variant, for tests and listings.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The stored and reported text.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;

            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownWord { what: $what, found: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

words! {
    /// What the agent last did with a model, per model (the `models.status`
    /// column, the `status` of `sentinel-agent status`/`models`, and the
    /// `state` reported to the hub).
    ModelStatus, "model status" {
        Downloading => "downloading",
        /// Downloaded and verified; loading and validating in a slot.
        Validating => "validating",
        /// A rollout in its shadow phase (mirrored traffic).
        Shadow => "shadow",
        /// A rollout in its canary phase (part of the traffic).
        Canary => "canary",
        Serving => "serving",
        /// Rolled back on this device; not retried at this revision.
        RolledBack => "rolled_back",
        /// Not acceptable here (wrong hardware, bad policy, bad artifact).
        Refused => "refused",
        /// Tried and failed (download gave up, load or validation failed).
        Failed => "failed",
        /// No longer in the desired state.
        Removed => "removed",
    }
}

words! {
    /// What an event in the agent's event log (and the hub's) is about.
    EventKind, "event kind" {
        StateRefused => "state_refused",
        DownloadStarted => "download_started",
        DownloadResumed => "download_resumed",
        DownloadRefused => "download_refused",
        PolicyInvalid => "policy_invalid",
        ModelFailed => "model_failed",
        ModelInstalled => "model_installed",
        /// An install refused by the slot state machine.
        Refused => "refused",
        LoadFailed => "load_failed",
        ValidationFailed => "validation_failed",
        StoreFailed => "store_failed",
        RolloutPhase => "rollout_phase",
        RolloutComplete => "rollout_complete",
        RolloutCancelled => "rollout_cancelled",
        RolledBack => "rolled_back",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_status_round_trips() {
        for s in ModelStatus::ALL {
            assert_eq!(s.as_str().parse::<ModelStatus>(), Ok(*s));
            assert_eq!(s.to_string(), s.as_str());
        }
    }

    #[test]
    fn every_event_kind_round_trips() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>(), Ok(*k));
            assert_eq!(k.to_string(), k.as_str());
        }
    }

    #[test]
    fn stored_text_is_unchanged() {
        assert_eq!(ModelStatus::RolledBack.as_str(), "rolled_back");
        assert_eq!(EventKind::StateRefused.as_str(), "state_refused");
    }

    #[test]
    fn an_unknown_word_is_an_error_that_names_it() {
        let e = "pending!".parse::<ModelStatus>().expect_err("not a status");
        assert_eq!(e.to_string(), "unknown model status `pending!`");
        let e = "Rolled_Back".parse::<EventKind>().expect_err("case matters");
        assert_eq!(e.to_string(), "unknown event kind `Rolled_Back`");
    }
}
