//! Helpers every layer of the agent may use: the wall clock in
//! milliseconds, an error's chain on one line, handing freed heap back to
//! the kernel, and blocking work kept off the Tokio workers. Nothing else of the crate is named here, so any module can
//! import it.

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// How often [`trim_heap`] hands freed memory back.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(20);

/// Hands the heap memory freed since the last call back to the kernel
/// (`malloc_trim`), every `every` until `stop` turns true.
///
/// Why trim rather than another allocator: glibc's malloc is what the agent
/// and every crate in it already use, and it grows its mmap threshold after
/// the first large block is freed, so the later bodies of a burst of large
/// requests (530 KB text-direction JSON) land on its heaps and stay resident
/// after they are freed: 15 MiB idle became 27-29 MiB after such traffic.
/// `malloc_trim(0)` releases free pages anywhere in every arena; it takes
/// milliseconds on a heap this size and runs on a blocking thread, so it
/// never stalls a request. jemalloc or mimalloc would add a C dependency to
/// the cross build for the same effect.
pub async fn trim_heap(every: std::time::Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let _ = tokio::task::spawn_blocking(release_free_heap).await;
    }
}

/// One `malloc_trim(0)`, where the C library has it.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it takes an integer
    // and touches no memory the program owns.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `f`, which blocks (a fork, an fsync), without holding up the other
/// tasks of the Tokio worker thread it is called on: on a multi-thread
/// runtime the runtime hands them to another thread meanwhile
/// (`block_in_place`). On a device with two cores the runtime has two
/// workers, and a request queued behind a blocked one waits for it.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
