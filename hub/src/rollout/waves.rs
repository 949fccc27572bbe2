//! Staged fleet rollouts: a deployment reaches its targeted devices in
//! waves, each a cumulative percentage (`[10, 50, 100]`), and widens to the
//! next wave once every device of the current one serves the version.
//!
//! A device belongs to the waves at and above its bucket: a number in
//! 0..100 from a hash of the deployment id and the device id. The bucket
//! never changes, so a device that got the version keeps it as the
//! deployment widens, and a device enrolled later lands in a wave by the
//! same rule. Devices outside the current wave keep the deployment the
//! waved one will replace.

use ring::digest;

use super::policy::PolicyError;

/// At most this many waves: more is a schedule, not a rollout.
pub const MAX_WAVES: usize = 10;

/// Checks a wave schedule: strictly increasing percentages in 1..=100,
/// ending at 100. Empty means no waves (everyone at once).
pub fn validate_waves(waves: &[u8]) -> Result<(), PolicyError> {
    let invalid = |i: usize, message: String| PolicyError { field: format!("waves[{i}]"), message };
    if waves.len() > MAX_WAVES {
        return Err(PolicyError {
            field: "waves".into(),
            message: format!("{} waves; at most {MAX_WAVES}", waves.len()),
        });
    }
    for (i, &p) in waves.iter().enumerate() {
        if !(1..=100).contains(&p) {
            return Err(invalid(i, format!("{p} is not a percentage of devices between 1 and 100")));
        }
        if i > 0 && p <= waves[i - 1] {
            return Err(invalid(i, format!("{p} does not widen the wave before it ({})", waves[i - 1])));
        }
    }
    match waves.last() {
        Some(&last) if last != 100 => {
            Err(invalid(waves.len() - 1, format!("the last wave is {last}%; it must be 100 so the rollout can finish")))
        }
        _ => Ok(()),
    }
}

/// The device's bucket for a deployment, 0..100.
pub fn bucket(deployment_id: i64, device_id: &str) -> u8 {
    let hash = digest::digest(&digest::SHA256, format!("{deployment_id}/{device_id}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_ref()[..8]);
    // The remainder is below 100, so it fits.
    u8::try_from(u64::from_be_bytes(first) % 100).unwrap_or(0)
}

/// The percentage of devices the current wave reaches: 100 without waves.
pub fn current_percent(waves: &[u8], wave: u32) -> u8 {
    usize::try_from(wave).ok().and_then(|w| waves.get(w)).copied().unwrap_or(100)
}

/// Whether the device is in the deployment's current wave.
pub fn in_wave(deployment_id: i64, waves: &[u8], wave: u32, device_id: &str) -> bool {
    let percent = current_percent(waves, wave);
    percent >= 100 || bucket(deployment_id, device_id) < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_widen_strictly_and_end_at_100() {
        assert_eq!(validate_waves(&[]), Ok(()));
        assert_eq!(validate_waves(&[100]), Ok(()));
        assert_eq!(validate_waves(&[1, 10, 50, 100]), Ok(()));
        let field = |w: &[u8]| validate_waves(w).unwrap_err().field;
        assert_eq!(field(&[0, 100]), "waves[0]");
        assert_eq!(field(&[10, 10, 100]), "waves[1]");
        assert_eq!(field(&[50, 20, 100]), "waves[1]");
        assert_eq!(field(&[10, 50]), "waves[1]");
        assert_eq!(field(&[10, 101]), "waves[1]");
        assert_eq!(field(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100]), "waves");
        assert!(validate_waves(&[10, 50]).unwrap_err().message.contains("must be 100"));
    }

    #[test]
    fn buckets_spread_evenly_and_waves_only_grow() {
        let devices: Vec<String> = (0..2000).map(|i| format!("edge-{i}")).collect();
        let in_10 = devices.iter().filter(|d| in_wave(7, &[10, 50, 100], 0, d)).count();
        assert!((140..=260).contains(&in_10), "about 10% of 2000: {in_10}");
        for d in &devices {
            if in_wave(7, &[10, 50, 100], 0, d) {
                assert!(in_wave(7, &[10, 50, 100], 1, d), "{d} left the wave as it widened");
            }
            assert!(in_wave(7, &[10, 50, 100], 2, d), "the last wave is everyone");
            assert!(in_wave(7, &[], 0, d), "no waves is everyone");
        }
        assert_ne!(
            devices.iter().map(|d| bucket(7, d)).collect::<Vec<_>>(),
            devices.iter().map(|d| bucket(8, d)).collect::<Vec<_>>(),
            "each deployment draws its own first wave"
        );
    }
}
