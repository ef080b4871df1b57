//! Which rank owns which variable's optimizer state (ZeRO stage 1): a partition balanced by
//! bytes, the same on every rank.

/// Owners for variables given by their sizes in bytes, in the variables' order (which every
/// rank shares): the largest variable first (ties in order) goes to the rank holding the
/// fewest bytes so far (ties to the lower rank), the greedy rule for balanced partitions.
/// No rank gets more than the average plus the largest variable.
pub(super) fn partition(bytes: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..bytes.len()).collect();
    order.sort_by(|&a, &b| bytes[b].cmp(&bytes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world];
    let mut owner = vec![0usize; bytes.len()];
    for i in order {
        let lightest = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        owner[i] = lightest;
        load[lightest] += bytes[i];
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::partition;

    #[test]
    fn balances_by_bytes_deterministically() {
        // binarynet-like: a few large kernels and many small vectors.
        let bytes = [4_718_592, 1_179_648, 2_359_296, 512, 512, 1024, 9_437_184, 40, 40];
        let owners = partition(&bytes, 2);
        assert_eq!(owners, partition(&bytes, 2));
        let load =
            |r| bytes.iter().zip(&owners).filter(|(_, &o)| o == r).map(|(b, _)| b).sum::<usize>();
        let (a, b) = (load(0), load(1));
        let largest = *bytes.iter().max().unwrap();
        assert!(a.abs_diff(b) <= largest, "{a} vs {b}");
        assert_eq!(owners[6], 0, "the largest goes first, to rank 0");
    }

    #[test]
    fn one_rank_owns_everything_and_empty_is_fine() {
        assert_eq!(partition(&[3, 1, 2], 1), vec![0, 0, 0]);
        assert!(partition(&[], 4).is_empty());
        let owners = partition(&[1, 1, 1, 1], 4);
        let mut sorted = owners.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
    }
}
