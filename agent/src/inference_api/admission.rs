//! The in-flight budget of the inference API: request bodies being read,
//! decoded and run together may hold at most `serving.max_inflight_bytes`.
//! A request that does not fit is refused at once with 503 and
//! `Retry-After`, before its body is read, instead of queueing: a burst of
//! large bodies must not take the agent (and every model on it) past its
//! memory limit.
//!
//! A body announced by `Content-Length` is reserved whole before reading; a
//! chunked body reserves each chunk as it arrives. When a large request ends
//! and the budget is idle again, freed heap pages are handed back to the
//! kernel, so the agent returns near its idle size after a burst.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Budget unit: permits count KiB, so a u32 permit count covers any body.
const UNIT: usize = 1024;
/// Requests larger than this trim the heap when the budget drains.
const TRIM_AFTER: usize = 1 << 20;

/// Shared budget of bytes in flight.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    permits: Arc<Semaphore>,
    total_units: usize,
    limit_bytes: usize,
    trimming: AtomicBool,
}

/// Bytes held by one request; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    admission: Admission,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

/// A request refused because the budget is spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    pub wanted: usize,
    pub limit: usize,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wanted > self.limit {
            write!(f, "a request of {} bytes is over the in-flight limit of {} bytes", self.wanted, self.limit)
        } else {
            write!(f, "the agent is at its limit of {} bytes of requests in flight; retry shortly", self.limit)
        }
    }
}

fn units(bytes: usize) -> usize {
    bytes.div_ceil(UNIT)
}

impl Admission {
    /// A budget of `limit_bytes` (at least one unit).
    pub fn new(limit_bytes: usize) -> Admission {
        let total_units = units(limit_bytes).clamp(1, Semaphore::MAX_PERMITS);
        Admission {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(total_units)),
                total_units,
                limit_bytes,
                trimming: AtomicBool::new(false),
            }),
        }
    }

    /// An empty reservation, to grow with [`Reservation::grow`].
    pub fn reservation(&self) -> Reservation {
        Reservation { admission: self.clone(), permit: None, bytes: 0 }
    }

    /// Bytes of the budget in use now.
    pub fn in_flight_bytes(&self) -> usize {
        (self.inner.total_units - self.inner.permits.available_permits()) * UNIT
    }
}

impl Reservation {
    /// Adds `bytes` to this request's share, or refuses without waiting.
    pub fn grow(&mut self, bytes: usize) -> Result<(), Busy> {
        let inner = &self.admission.inner;
        let wanted = self.bytes.saturating_add(bytes);
        let more = units(wanted) - units(self.bytes);
        if more == 0 {
            self.bytes = wanted;
            return Ok(());
        }
        let busy = Busy { wanted, limit: inner.limit_bytes };
        let n = u32::try_from(more).map_err(|_| busy.clone())?;
        match inner.permits.clone().try_acquire_many_owned(n) {
            Ok(p) => {
                match &mut self.permit {
                    Some(held) => held.merge(p),
                    None => self.permit = Some(p),
                }
                self.bytes = wanted;
                Ok(())
            }
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => Err(busy),
        }
    }

    /// Bytes this request holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        drop(self.permit.take());
        let inner = &self.admission.inner;
        if self.bytes >= TRIM_AFTER
            && inner.permits.available_permits() == inner.total_units
            && !inner.trimming.swap(true, Ordering::AcqRel)
        {
            let admission = self.admission.clone();
            // Trimming walks the heap: not on a runtime thread.
            let trim = move || {
                release_freed_memory();
                admission.inner.trimming.store(false, Ordering::Release);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(trim);
                }
                Err(_) => trim(),
            }
        }
    }
}

/// glibc keeps freed request buffers in its arenas (808 MB stayed held
/// after a burst of 32 large bodies); hand them back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap pages; it has no
    // preconditions and touches no memory the program still owns.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_fit_until_the_budget_is_spent_and_get_it_back_when_done() {
        let a = Admission::new(10 * UNIT);
        let mut r1 = a.reservation();
        r1.grow(6 * UNIT).unwrap();
        let mut r2 = a.reservation();
        assert_eq!(r2.grow(5 * UNIT), Err(Busy { wanted: 5 * UNIT, limit: 10 * UNIT }));
        r2.grow(4 * UNIT).unwrap();
        assert_eq!(a.in_flight_bytes(), 10 * UNIT);
        drop(r1);
        assert_eq!(a.in_flight_bytes(), 4 * UNIT);
        r2.grow(6 * UNIT).unwrap();
        assert_eq!(r2.bytes(), 10 * UNIT);
        drop(r2);
        assert_eq!(a.in_flight_bytes(), 0);
    }

    #[test]
    fn chunks_round_up_to_units_without_double_counting() {
        let a = Admission::new(2 * UNIT);
        let mut r = a.reservation();
        for _ in 0..UNIT {
            r.grow(2).unwrap();
        }
        assert_eq!(r.bytes(), 2 * UNIT);
        assert_eq!(a.in_flight_bytes(), 2 * UNIT);
        assert!(r.grow(1).is_err());
    }

    #[test]
    fn a_request_larger_than_the_budget_says_so() {
        let a = Admission::new(UNIT);
        let err = a.reservation().grow(usize::MAX).unwrap_err();
        assert!(err.to_string().contains("is over the in-flight limit"), "{err}");
        let mut held = a.reservation();
        held.grow(UNIT).unwrap();
        assert!(a.reservation().grow(1).unwrap_err().to_string().contains("retry shortly"));
    }
}
