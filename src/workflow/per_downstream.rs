//! One value per downstream (queues, circuits, limits, calls in flight), indexed by
//! [`Downstream`].

use std::ops::{Index, IndexMut};

use crate::domain::Downstream;

/// A `T` for POND and one for Rev.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerDownstream<T> {
    pond: T,
    rev: T,
}

impl<T> PerDownstream<T> {
    /// Each downstream's value, from `f`.
    pub fn new(mut f: impl FnMut(Downstream) -> T) -> Self {
        Self {
            pond: f(Downstream::Pond),
            rev: f(Downstream::Rev),
        }
    }

    /// Every downstream with its value, POND first.
    pub fn iter(&self) -> impl Iterator<Item = (Downstream, &T)> {
        [(Downstream::Pond, &self.pond), (Downstream::Rev, &self.rev)].into_iter()
    }

    /// Every downstream with its value, mutable, POND first.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Downstream, &mut T)> {
        [
            (Downstream::Pond, &mut self.pond),
            (Downstream::Rev, &mut self.rev),
        ]
        .into_iter()
    }

    /// The values, POND first.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        [&self.pond, &self.rev].into_iter()
    }
}

impl<T> Index<Downstream> for PerDownstream<T> {
    type Output = T;

    fn index(&self, d: Downstream) -> &T {
        match d {
            Downstream::Pond => &self.pond,
            Downstream::Rev => &self.rev,
        }
    }
}

impl<T> IndexMut<Downstream> for PerDownstream<T> {
    fn index_mut(&mut self, d: Downstream) -> &mut T {
        match d {
            Downstream::Pond => &mut self.pond,
            Downstream::Rev => &mut self.rev,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_downstream_has_its_own_value() {
        let mut calls = PerDownstream::new(|d| usize::from(d == Downstream::Rev) * 10);
        calls[Downstream::Pond] += 1;
        calls[Downstream::Rev] += 2;
        assert_eq!(calls[Downstream::Pond], 1);
        assert_eq!(calls[Downstream::Rev], 12);
        assert_eq!(
            calls.iter().collect::<Vec<_>>(),
            vec![(Downstream::Pond, &1), (Downstream::Rev, &12)]
        );
        for (d, n) in calls.iter_mut() {
            *n += usize::from(d == Downstream::Pond);
        }
        assert_eq!(calls.values().sum::<usize>(), 14);
    }
}
