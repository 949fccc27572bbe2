//! API tokens and roles.
//!
//! A token is `snt_` followed by 32 random bytes in URL-safe base64. Only its
//! SHA-256 is stored: the secret has 256 bits of entropy, so a fast hash is
//! enough and a stolen database yields no usable token.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};

/// What a token may do.
///
/// `viewer` reads; `publisher` also pushes versions and edits metadata;
/// `deployer` also deploys and rolls back; `admin` may do everything,
/// including tokens, deletes and keys. Publisher and deployer are separate
/// duties: neither implies the other. `device` is held only by enrolled
/// devices' tokens: it may fetch what the device's own desired state names
/// and nothing else, not even what a viewer may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Publisher,
    Deployer,
    Admin,
    Device,
}

impl Role {
    /// The roles an API token can have (device tokens come from enrolment).
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Publisher, Role::Deployer, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Publisher => "publisher",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
            Role::Device => "device",
        }
    }

    /// Whether a token with this role may do what `required` is needed for.
    pub fn allows(self, required: Role) -> bool {
        match self {
            Role::Device => required == Role::Device,
            Role::Admin => required != Role::Device,
            role => role == required || required == Role::Viewer,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name this hub does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {value:?}; use viewer, publisher, deployer or admin")]
pub struct UnknownRole {
    pub value: String,
}

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole { value: s.to_owned() })
    }
}

/// Who is calling: the token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: i64,
    pub name: String,
    pub role: Role,
    /// Set for device tokens: the enrolled device's id.
    pub device_id: Option<String>,
}

/// A fresh token secret.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    // The system RNG does not fail on Linux once the kernel pool is seeded.
    SystemRandom::new().fill(&mut bytes).unwrap_or_else(|_| panic_rng());
    format!("snt_{}", URL_SAFE_NO_PAD.encode(bytes))
}

#[cold]
fn panic_rng() {
    // Handing out a predictable token would be worse than stopping.
    #[allow(clippy::panic)]
    {
        panic!("the system random number generator failed")
    }
}

/// The stored form of a token secret.
pub fn hash_token(secret: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, secret.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_an_unknown_one_says_which_exist() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        let e = "root".parse::<Role>().unwrap_err();
        assert_eq!(e.to_string(), r#"unknown role "root"; use viewer, publisher, deployer or admin"#);
    }

    #[test]
    fn role_matrix() {
        use Role::*;
        let allowed = |have: Role, need: Role| have.allows(need);
        for r in Role::ALL {
            assert!(allowed(r, Viewer), "{r} reads");
            assert!(allowed(Admin, r), "admin does {r}");
        }
        assert!(!allowed(Viewer, Publisher));
        assert!(!allowed(Viewer, Deployer));
        assert!(!allowed(Publisher, Deployer));
        assert!(!allowed(Deployer, Publisher));
        assert!(!allowed(Publisher, Admin));
        assert!(!allowed(Deployer, Admin));
        for r in Role::ALL {
            assert!(!allowed(Device, r), "a device token is no API token");
            assert!(!allowed(r, Device), "no API token acts as a device");
        }
        assert!(allowed(Device, Device));
    }

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert!(a.starts_with("snt_"));
        assert_eq!(hash_token(&a), hash_token(&format!("{a}\n")), "trailing newline from a file is ignored");
        assert_ne!(hash_token(&a), hash_token(&b));
    }
}
