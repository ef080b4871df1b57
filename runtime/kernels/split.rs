//! Splitting a pass over many variables between threads: how many threads the work pays for,
//! each thread's share of the elements, and the pieces of variables a share covers.
//!
//! A pass sees its variables as one concatenation of runs of elements; each thread takes a
//! contiguous share of it, which may start and end inside a variable.

/// Below this many elements per thread, a second thread does not pay. On 2000 variables of 256
/// elements (2^19 in all; half of them Bop's, half Adam's, so each kernel pass has 2^18 and the
/// router's gradient check 2^19) the per-variable work before the kernels dominates the step,
/// but splitting the passes still pays: with 2^16 here a router step took 0.85x, 0.85x and
/// 0.86x the time it took with 2^18 and 2^17 (medians of 40 paired in-process rounds of 50
/// steps, 2 threads, AMD EPYC Zen 3, AVX2, 2026-12-07), and 2^15 gave the same as 2^16
/// (1.01x).
pub(crate) const MIN_ELEMENTS_PER_THREAD: usize = 1 << 16;

/// The pieces of elements `[lo, hi)` of the concatenation of runs of lengths `lens`, in order:
/// (run index, first element of the piece within its run, element count), empty pieces left out.
pub(crate) fn pieces(
    lens: impl IntoIterator<Item = usize>,
    lo: usize,
    hi: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut offset = 0;
    lens.into_iter()
        .enumerate()
        .map_while(move |(k, len)| {
            if offset >= hi {
                return None;
            }
            let (start, end, base) = (lo.max(offset), hi.min(offset + len), offset);
            offset += len;
            Some((k, start, end, base))
        })
        .filter(|&(_, start, end, _)| start < end)
        .map(|(k, start, end, base)| (k, start - base, end - start))
}

/// How many threads to use for `total` elements: at most `wanted`, and no more than leaves
/// each `min_per_thread` elements; at least one.
pub(crate) fn threads_for(total: usize, wanted: usize, min_per_thread: usize) -> usize {
    wanted.min(total / min_per_thread.max(1)).max(1)
}

/// Thread `t`'s share `[lo, hi)` of `total` elements split `threads` ways, boundaries rounded
/// to 16 elements so that threads do not share cache lines.
pub(crate) fn share(total: usize, threads: usize, t: usize) -> (usize, usize) {
    let at = |k: usize| if k >= threads { total } else { ((total / threads * k) & !15).min(total) };
    (at(t), at(t + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_the_concatenation_at_the_range() {
        let lens = [3usize, 0, 5, 2];
        let all = |lo, hi| pieces(lens, lo, hi).collect::<Vec<_>>();
        assert_eq!(all(0, 10), vec![(0, 0, 3), (2, 0, 5), (3, 0, 2)]);
        assert_eq!(all(2, 4), vec![(0, 2, 1), (2, 0, 1)]);
        assert_eq!(all(3, 8), vec![(2, 0, 5)]);
        assert_eq!(all(9, 10), vec![(3, 1, 1)]);
        assert_eq!(all(4, 4), vec![]);
        assert_eq!(all(10, 10), vec![]);
    }

    #[test]
    fn threads_follow_the_work() {
        assert_eq!(threads_for(0, 4, 100), 1);
        assert_eq!(threads_for(99, 4, 100), 1);
        assert_eq!(threads_for(250, 4, 100), 2);
        assert_eq!(threads_for(10_000, 4, 100), 4);
        assert_eq!(threads_for(10_000, 0, 100), 1);
    }

    #[test]
    fn shares_cover_everything_once_on_cache_line_boundaries() {
        for total in [0usize, 1, 15, 16, 17, 1000, 12_345] {
            for threads in 1..6 {
                let mut next = 0;
                for t in 0..threads {
                    let (lo, hi) = share(total, threads, t);
                    assert_eq!(lo, next, "total {total} threads {threads}");
                    assert!(lo <= hi);
                    assert!(lo % 16 == 0 || lo == total);
                    next = hi;
                }
                assert_eq!(next, total);
            }
        }
    }
}
