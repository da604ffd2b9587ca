//! Returning freed heap to the kernel. A large listing allocates its pages,
//! the per-page parameter vectors and the directory maps it builds, then frees
//! most of them; glibc keeps freed memory in its arenas, so without a trim the
//! daemon's resident size stays at the peak of the largest listing it ever did.

/// Freed memory goes back within half a minute; a trim takes well under a
/// millisecond even with a 100,000-entry cache.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Listings smaller than this leave too little behind to be worth a trim.
pub const TRIM_AFTER_LISTING_OF: usize = 256;

/// Gives free heap pages back to the kernel (glibc only; a no-op elsewhere).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
