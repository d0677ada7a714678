//! A parent's health as the failover upstream sees it: a pure state
//! machine over read outcomes and probe results, with hysteresis so a
//! parent that flickers is not taken back at its first good answer.
//!
//! ```text
//!        read lost / probe failed / deadline
//!   Up ───────────────────────────────────────▶ Down
//!    ▲                                            │ probe ok: good streak starts
//!    └──── probes ok for `rejoin_after` ◀─────────┘ (any failure resets it)
//! ```

use std::time::{Duration, Instant};

/// What a parent is to its child right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    /// Skipped while any parent is up; `good_since` is the start of the
    /// current run of successful probes.
    Down {
        since: Instant,
        good_since: Option<Instant>,
    },
}

/// Health of one parent.
#[derive(Debug, Clone, Copy)]
pub struct Health {
    state: State,
    rejoin_after: Duration,
}

/// A change worth logging and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    WentDown,
    CameBack { down_for: Duration },
}

impl Health {
    /// A parent starts up: it is tried before it is doubted.
    #[must_use]
    pub fn new(rejoin_after: Duration) -> Self {
        Self {
            state: State::Up,
            rejoin_after,
        }
    }

    #[must_use]
    pub fn state(&self) -> State {
        self.state
    }

    #[must_use]
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// A read was lost, timed out, or a probe went unanswered.
    pub fn failed(&mut self, now: Instant) -> Option<Change> {
        match &mut self.state {
            State::Up => {
                self.state = State::Down {
                    since: now,
                    good_since: None,
                };
                Some(Change::WentDown)
            }
            State::Down { good_since, .. } => {
                *good_since = None;
                None
            }
        }
    }

    /// A probe (or a last-resort read) was answered.
    pub fn answered(&mut self, now: Instant) -> Option<Change> {
        match &mut self.state {
            State::Up => None,
            State::Down { since, good_since } => {
                let start = *good_since.get_or_insert(now);
                if now.duration_since(start) >= self.rejoin_after {
                    let down_for = now.duration_since(*since);
                    self.state = State::Up;
                    Some(Change::CameBack { down_for })
                } else {
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REJOIN: Duration = Duration::from_secs(5);

    #[test]
    fn one_failure_takes_a_parent_down_once() {
        let t = Instant::now();
        let mut h = Health::new(REJOIN);
        assert!(h.is_up());
        assert_eq!(h.failed(t), Some(Change::WentDown));
        assert_eq!(h.failed(t + Duration::from_secs(1)), None);
        assert!(!h.is_up());
    }

    #[test]
    fn a_parent_comes_back_only_after_answering_for_the_whole_window() {
        let t = Instant::now();
        let mut h = Health::new(REJOIN);
        h.failed(t);
        let s = Duration::from_secs;
        assert_eq!(h.answered(t + s(1)), None);
        assert_eq!(h.answered(t + s(4)), None);
        assert_eq!(
            h.answered(t + s(6)),
            Some(Change::CameBack { down_for: s(6) })
        );
        assert!(h.is_up());
    }

    #[test]
    fn a_flapping_parent_stays_down() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut h = Health::new(REJOIN);
        h.failed(t);
        // Good, bad, good, bad … every 3 s: the streak never lasts 5 s.
        for i in 0..10 {
            let at = t + s(1 + 3 * i);
            if i % 2 == 0 {
                assert_eq!(h.answered(at), None);
            } else {
                assert_eq!(h.failed(at), None);
            }
        }
        assert!(!h.is_up());
    }

    #[test]
    fn answers_while_up_change_nothing() {
        let t = Instant::now();
        let mut h = Health::new(REJOIN);
        assert_eq!(h.answered(t), None);
        assert!(h.is_up());
    }
}
