//! A fixed pool of worker threads that run one kernel at a time on every thread
//! (`f(tid, nthreads)`), the calling thread being thread 0. Workers spin briefly between
//! kernels (a decode step launches hundreds of small kernels back to back) and then sleep
//! on a condition variable, so an idle pool costs nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::RuntimeError;

/// The most threads a pool may have: past any machine's cores, so a larger count is a
/// mistake, and one the system might not survive.
pub const MAX_POOL_THREADS: usize = 4096;

/// How long an idle worker spins before sleeping.
const SPIN: Duration = Duration::from_micros(200);

type Task = Arc<dyn Fn(usize, usize) + Send + Sync>;

struct Shared {
    epoch: AtomicUsize,
    remaining: AtomicUsize,
    /// Workers asleep on `wake` (or about to be): only then does `run` pay for a notify.
    sleepers: AtomicUsize,
    stop: AtomicBool,
    task: Mutex<Option<Task>>,
    wake: Condvar,
    sleep_lock: Mutex<()>,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n: usize,
}

impl Pool {
    /// A pool of `n` threads in all (the caller plus `n - 1` workers), at most
    /// `MAX_POOL_THREADS`; an error where the system cannot start that many.
    pub fn new(n: usize) -> Result<Pool, RuntimeError> {
        let n = n.max(1);
        if n > MAX_POOL_THREADS {
            return Err(RuntimeError::Invalid(format!(
                "{n} threads is over the limit of {MAX_POOL_THREADS}"
            )));
        }
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            task: Mutex::new(None),
            wake: Condvar::new(),
            sleep_lock: Mutex::new(()),
        });
        let mut pool = Pool {
            shared,
            workers: Vec::with_capacity(n - 1),
            n,
        };
        for tid in 1..n {
            let sh = pool.shared.clone();
            let w = std::thread::Builder::new()
                .name(format!("egret-{tid}"))
                .spawn(move || worker(sh, tid, n))
                .map_err(|e| RuntimeError::Invalid(format!("cannot start {n} threads: {e}")))?;
            // (on an error, dropping the pool stops and joins the workers started so far)
            pool.workers.push(w);
        }
        Ok(pool)
    }

    pub fn threads(&self) -> usize {
        self.n
    }

    /// Runs `f(tid, n)` on every thread and returns when all are done.
    pub fn run(&self, f: Task) {
        if self.n == 1 {
            f(0, 1);
            return;
        }
        *self.shared.task.lock().expect("pool lock") = Some(f.clone());
        self.shared.remaining.store(self.n - 1, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        // A worker about to sleep re-checks the epoch under `sleep_lock` after counting
        // itself in `sleepers` (both SeqCst): either it sees the new epoch or we see it.
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.shared.sleep_lock.lock().expect("pool lock");
            self.shared.wake.notify_all();
        }
        f(0, self.n);
        let mut spins = 0u32;
        while self.shared.remaining.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn worker(sh: Arc<Shared>, tid: usize, n: usize) {
    let mut seen = 0usize;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if sh.stop.load(Ordering::Acquire) {
                return;
            }
            if sh.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            spins += 1;
            if spins % 1024 == 0 && start.elapsed() > SPIN {
                let g = sh.sleep_lock.lock().expect("pool lock");
                sh.sleepers.fetch_add(1, Ordering::SeqCst);
                if sh.epoch.load(Ordering::SeqCst) == seen && !sh.stop.load(Ordering::Acquire) {
                    let _g = sh
                        .wake
                        .wait_timeout(g, Duration::from_millis(50))
                        .expect("pool lock");
                }
                sh.sleepers.fetch_sub(1, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
        seen = sh.epoch.load(Ordering::Acquire);
        let task = sh.task.lock().expect("pool lock").clone();
        if let Some(t) = task {
            t(tid, n);
        }
        sh.remaining.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.sleep_lock.lock();
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_task_once() {
        let pool = Pool::new(3).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        for _ in 0..200 {
            let h = hits.clone();
            pool.run(Arc::new(move |tid, n| {
                assert!(tid < n);
                h.fetch_add(1 << (8 * tid), Ordering::SeqCst);
            }));
        }
        let v = hits.load(Ordering::SeqCst);
        assert_eq!(
            (v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff),
            (200, 200, 200)
        );
    }
}
