//! Runs the kernels' per-thread work on libtorch's intra-op thread pool (`at::parallel_for`,
//! through `shim/parallel.cpp`), instead of threads of our own.
//!
//! libtorch's OpenMP workers keep spinning for a while after each parallel op, so on a small
//! machine a thread spawned for the optimizer step right after the backward pass shares a core
//! with a spinning worker; handing the work to those workers removes both the contention and
//! the cost of starting a thread each step.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

type Task = unsafe extern "C" fn(ctx: *mut c_void, begin: i64, end: i64);

extern "C" {
    fn caseopt_parallel_for(n: i64, grain: i64, task: Task, ctx: *mut c_void) -> i32;
}

/// What the trampoline needs: the work and where to record a panic.
struct TaskContext<'a, F> {
    work: &'a F,
    panicked: AtomicBool,
}

/// Calls `work(t)` for every `t` in `[begin, end)`, catching panics (which must not unwind into
/// C++) and recording them.
///
/// # Safety
/// `ctx` must point to a live `TaskContext<F>`.
unsafe extern "C" fn trampoline<F: Fn(usize) + Sync>(ctx: *mut c_void, begin: i64, end: i64) {
    // SAFETY: `run` passes a pointer to its `TaskContext<F>`, alive until `caseopt_parallel_for`
    // returns, which waits for every task.
    let context = unsafe { &*(ctx as *const TaskContext<'_, F>) };
    for t in begin.max(0)..end.max(0) {
        if catch_unwind(AssertUnwindSafe(|| (context.work)(t as usize))).is_err() {
            context.panicked.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs `work(0)`, ..., `work(tasks - 1)` on libtorch's intra-op pool (each task on one of its
/// threads when it has that many, fewer at a time otherwise; the calling thread takes part)
/// and returns when all are done. With one task, or should libtorch refuse, the tasks run on
/// the calling thread. A panic in a task is raised again here, after all have finished.
pub(crate) fn run<F: Fn(usize) + Sync>(tasks: usize, work: F) {
    if tasks <= 1 {
        (0..tasks).for_each(&work);
        return;
    }
    let context = TaskContext { work: &work, panicked: AtomicBool::new(false) };
    let n = i64::try_from(tasks).unwrap_or(i64::MAX);
    // SAFETY: `trampoline::<F>` reads `ctx` as the `TaskContext<F>` above, which outlives the call;
    // `caseopt_parallel_for` returns only after every chunk ran, and catches libtorch's
    // exceptions; the work is `Sync`, so running it from several threads at once is sound.
    let refused = unsafe {
        caseopt_parallel_for(
            n,
            1,
            trampoline::<F>,
            &context as *const TaskContext<'_, F> as *mut c_void,
        )
    };
    if refused != 0 {
        // libtorch raised before running anything (its pool could not start): run here.
        (0..tasks).for_each(&work);
    }
    if context.panicked.load(Ordering::Relaxed) {
        panic!("a caseopt kernel task panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    #[test]
    fn every_task_runs_once() {
        for tasks in [0usize, 1, 2, 3, 7] {
            let seen = Mutex::new(vec![0u32; tasks]);
            run(tasks, |t| seen.lock().unwrap()[t] += 1);
            assert_eq!(*seen.lock().unwrap(), vec![1; tasks], "{tasks} tasks");
        }
    }

    #[test]
    fn tasks_run_on_different_threads_when_libtorch_has_them() {
        // `at::parallel_for` is a header template: compiled without OpenMP (build.rs), it runs
        // every task on the calling thread, silently. This is the check that it does not.
        if tch::get_num_threads() < 2 {
            eprintln!("skipped: libtorch has {} intra-op thread(s)", tch::get_num_threads());
            return;
        }
        let ids = Mutex::new(Vec::new());
        run(2, |_| ids.lock().unwrap().push(std::thread::current().id()));
        let ids = ids.into_inner().unwrap();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1], "both tasks ran on one thread");
    }

    #[test]
    fn a_panicking_task_is_reported_after_the_others_ran() {
        let ran = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run(4, |t| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert_ne!(t, 2, "task 2 fails");
            })
        }));
        assert!(result.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 4);
    }
}
