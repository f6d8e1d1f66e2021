//! How an account's concurrency is split between the workers that use it: each worker states
//! what it wants and holds a share (a lease that runs out unless renewed); a share is the
//! max-min fair split of the account's concurrency, and a worker takes more than its fair part
//! only while nobody else is short. Pure: the store runs it under a lock on the account.

/// Another worker's live share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Other {
    pub wanted: usize,
    pub slots: usize,
}

/// The max-min fair split of `total` between `wants`: whoever wants less than an equal part
/// gets what it wants, the rest is split evenly between the others (the remainder to the
/// first ones).
pub fn fair_split(total: usize, wants: &[usize]) -> Vec<usize> {
    let mut split = vec![0; wants.len()];
    let mut left = total;
    let mut open: Vec<usize> = (0..wants.len()).filter(|&i| wants[i] > 0).collect();
    while left > 0 && !open.is_empty() {
        let each = (left / open.len()).max(1);
        let mut still_open = Vec::new();
        for &i in &open {
            if left == 0 {
                break;
            }
            let give = each.min(wants[i] - split[i]).min(left);
            split[i] += give;
            left -= give;
            if split[i] < wants[i] {
                still_open.push(i);
            }
        }
        open = still_open;
    }
    split
}

/// The slots a worker wanting `wanted` may use now, given the other live shares: its fair part,
/// or more while every other worker has its own fair part; never what the others hold.
/// `others` and the worker's own place among them (`place`) are in one order every worker
/// agrees on (by name), so that the remainder of an uneven split goes to the same workers in
/// every worker's reckoning.
pub fn grant(total: usize, wanted: usize, others: &[Other], place: usize) -> usize {
    let place = place.min(others.len());
    let mut wants: Vec<usize> = others.iter().map(|o| o.wanted).collect();
    wants.insert(place, wanted);
    let mut fair = fair_split(total, &wants);
    let mine = fair.remove(place);
    let held: usize = others.iter().map(|o| o.slots).sum();
    let free = total.saturating_sub(held);
    let others_satisfied = others
        .iter()
        .zip(&fair)
        .all(|(o, f)| o.slots >= (*f).min(o.wanted));
    if others_satisfied {
        wanted.min(free).max(mine.min(free))
    } else {
        mine.min(free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_max_min_fair() {
        assert_eq!(fair_split(32, &[100, 100]), vec![16, 16]);
        assert_eq!(fair_split(32, &[4, 100, 100]), vec![4, 14, 14]);
        assert_eq!(fair_split(10, &[100, 100, 100]), vec![4, 3, 3]);
        assert_eq!(fair_split(32, &[0, 5]), vec![0, 5]);
        assert_eq!(fair_split(2, &[1, 1, 1]), vec![1, 1, 0]);
    }

    #[test]
    fn a_newcomer_gets_what_is_free_and_its_fair_part_once_the_others_shrink() {
        let hog = Other {
            wanted: 100,
            slots: 32,
        };
        assert_eq!(grant(32, 20, &[hog], 1), 0, "nothing is free yet");
        // The hog's next renewal sees the newcomer short and shrinks to its fair part.
        let newcomer = Other {
            wanted: 20,
            slots: 0,
        };
        assert_eq!(grant(32, 100, &[newcomer], 1), 16);
        let hog = Other {
            wanted: 100,
            slots: 16,
        };
        assert_eq!(grant(32, 20, &[hog], 1), 16);
    }

    #[test]
    fn a_worker_may_take_more_than_its_part_while_nobody_is_short() {
        let small = Other {
            wanted: 4,
            slots: 4,
        };
        assert_eq!(grant(32, 100, &[small], 1), 28);
        assert_eq!(grant(32, 100, &[], 0), 32);
        assert_eq!(grant(32, 0, &[], 0), 0);
    }

    #[test]
    fn an_uneven_split_adds_up_to_the_whole_in_every_workers_reckoning() {
        let want = |slots| Other { wanted: 8, slots };
        // Three workers by name: a, b, c; each reckons with the other two.
        let a = grant(8, 8, &[want(0), want(0)], 0);
        let b = grant(8, 8, &[want(a), want(0)], 1);
        let c = grant(8, 8, &[want(a), want(b)], 2);
        assert_eq!((a, b, c), (3, 3, 2));
    }
}
