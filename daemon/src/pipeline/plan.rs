//! The fetch planner: which sections of which chunks to request, in which order, and how many
//! at once; and which layers became ready for the engine.
//!
//! Sans-IO: it never touches a socket, a decoder or a clock. The driver feeds events in with
//! `handle_*` and takes work out with `poll_*`, in this order per step:
//! 1. `poll_request` until it returns `None` (the window is full or everything is requested);
//! 2. when a section arrives, `handle_received`; when it is restored, `handle_restored`
//!    (or `handle_failed` to give the slot back);
//! 3. `poll_ready` until `None`, to tell the engine about newly complete layers.
//!
//! Order: sections are requested by their first layer, then by chunk, so layer group 0 of every
//! chunk is restored before layer group 1 of any chunk. Readiness is per layer across all
//! chunks, which lets an engine start on layer 0 while later layers are still on the wire.

use std::collections::VecDeque;
use std::ops::Range;

/// One section of one chunk, as the planner names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SectionRef {
    /// Index of the chunk in the fetched prefix.
    pub chunk: usize,
    /// Index of the section inside its chunk object.
    pub section: usize,
}

/// Why a plan could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// A section covers layers outside `0..num_layers`, or no layers.
    #[error("chunk {chunk} section {section} covers layers {layers:?} of {num_layers}")]
    BadLayers {
        /// The chunk.
        chunk: usize,
        /// The section.
        section: usize,
        /// The layers it claims.
        layers: Range<u32>,
        /// Layers in the model.
        num_layers: u32,
    },
    /// A chunk's sections do not cover every layer exactly once.
    #[error("chunk {chunk} sections do not cover each of {num_layers} layers exactly once")]
    Coverage {
        /// The chunk.
        chunk: usize,
        /// Layers in the model.
        num_layers: u32,
    },
    /// An event named a section that is not in the state the event needs.
    #[error("unexpected event for chunk {} section {}", .0.chunk, .0.section)]
    UnexpectedEvent(SectionRef),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Requested,
    Received,
    Restored,
}

/// The plan of one fetch: see the module doc for the calling order.
#[derive(Debug)]
pub struct FetchPlanner {
    /// Layer range of every section, per chunk.
    layers: Vec<Vec<Range<u32>>>,
    state: Vec<Vec<State>>,
    /// Sections not yet requested, in request order.
    queue: VecDeque<SectionRef>,
    /// Sections requested and not yet restored.
    in_flight: usize,
    max_in_flight: usize,
    /// Per layer: chunks whose section holding it is not restored yet.
    missing: Vec<usize>,
    /// Per layer: reported ready already.
    reported: Vec<bool>,
}

impl FetchPlanner {
    /// Plans a fetch of `chunks` (per chunk, the layer range of each section) for a model of
    /// `num_layers` layers, with at most `max_in_flight` sections requested but not restored.
    pub fn new(
        num_layers: u32,
        chunks: Vec<Vec<Range<u32>>>,
        max_in_flight: usize,
    ) -> Result<Self, PlanError> {
        for (c, sections) in chunks.iter().enumerate() {
            let mut covered = vec![0u8; num_layers as usize];
            for (s, l) in sections.iter().enumerate() {
                if l.start >= l.end || l.end > num_layers {
                    return Err(PlanError::BadLayers {
                        chunk: c,
                        section: s,
                        layers: l.clone(),
                        num_layers,
                    });
                }
                for layer in l.clone() {
                    covered[layer as usize] += 1;
                }
            }
            if covered.iter().any(|&n| n != 1) {
                return Err(PlanError::Coverage {
                    chunk: c,
                    num_layers,
                });
            }
        }
        let mut order: Vec<(u32, SectionRef)> = chunks
            .iter()
            .enumerate()
            .flat_map(|(chunk, sections)| {
                sections
                    .iter()
                    .enumerate()
                    .map(move |(section, l)| (l.start, SectionRef { chunk, section }))
            })
            .collect();
        order.sort();
        let state = chunks
            .iter()
            .map(|s| vec![State::Pending; s.len()])
            .collect();
        Ok(FetchPlanner {
            missing: vec![chunks.len(); num_layers as usize],
            reported: vec![false; num_layers as usize],
            layers: chunks,
            state,
            queue: order.into_iter().map(|(_, s)| s).collect(),
            in_flight: 0,
            max_in_flight: max_in_flight.max(1),
        })
    }

    /// The layers section `s` holds.
    pub fn layers_of(&self, s: SectionRef) -> Option<Range<u32>> {
        self.layers.get(s.chunk)?.get(s.section).cloned()
    }

    /// The next section to request, if the window has room.
    pub fn poll_request(&mut self) -> Option<SectionRef> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        let s = self.queue.pop_front()?;
        self.state[s.chunk][s.section] = State::Requested;
        self.in_flight += 1;
        Some(s)
    }

    /// Section `s` arrived from the store.
    pub fn handle_received(&mut self, s: SectionRef) -> Result<(), PlanError> {
        self.transition(s, State::Requested, State::Received)
    }

    /// Section `s` is decoded and written into the destination.
    pub fn handle_restored(&mut self, s: SectionRef) -> Result<(), PlanError> {
        self.transition(s, State::Received, State::Restored)?;
        self.in_flight -= 1;
        for layer in self.layers[s.chunk][s.section].clone() {
            self.missing[layer as usize] -= 1;
        }
        Ok(())
    }

    /// Section `s` failed after being requested: it goes back to the front of the queue and
    /// frees its slot (the driver decides whether to retry or give up).
    pub fn handle_failed(&mut self, s: SectionRef) -> Result<(), PlanError> {
        match self.state.get(s.chunk).and_then(|c| c.get(s.section)) {
            Some(State::Requested | State::Received) => {
                self.state[s.chunk][s.section] = State::Pending;
                self.in_flight -= 1;
                self.queue.push_front(s);
                Ok(())
            }
            _ => Err(PlanError::UnexpectedEvent(s)),
        }
    }

    /// The next run of layers that became complete for every chunk since the last call.
    pub fn poll_ready(&mut self) -> Option<Range<u32>> {
        let start = (0..self.missing.len()).find(|&l| self.missing[l] == 0 && !self.reported[l])?;
        let mut end = start;
        while end < self.missing.len() && self.missing[end] == 0 && !self.reported[end] {
            self.reported[end] = true;
            end += 1;
        }
        Some(start as u32..end as u32)
    }

    /// Sections requested and not yet restored.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether every section is restored.
    pub fn is_done(&self) -> bool {
        self.queue.is_empty() && self.in_flight == 0
    }

    fn transition(&mut self, s: SectionRef, from: State, to: State) -> Result<(), PlanError> {
        match self
            .state
            .get_mut(s.chunk)
            .and_then(|c| c.get_mut(s.section))
        {
            Some(st) if *st == from => {
                *st = to;
                Ok(())
            }
            _ => Err(PlanError::UnexpectedEvent(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(num_layers: u32, per: u32) -> Vec<Range<u32>> {
        (0..num_layers)
            .step_by(per as usize)
            .map(|s| s..(s + per).min(num_layers))
            .collect()
    }

    fn drain(p: &mut FetchPlanner) -> Vec<SectionRef> {
        std::iter::from_fn(|| p.poll_request()).collect()
    }

    #[test]
    fn group_zero_of_every_chunk_comes_first() {
        let mut p = FetchPlanner::new(4, vec![groups(4, 2); 3], 100).unwrap();
        let order = drain(&mut p);
        let got: Vec<(usize, usize)> = order.iter().map(|s| (s.chunk, s.section)).collect();
        assert_eq!(got, vec![(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn mixed_groupings_order_by_first_layer() {
        // Chunk 0 stored with one layer per section, chunk 1 with two.
        let mut p = FetchPlanner::new(4, vec![groups(4, 1), groups(4, 2)], 100).unwrap();
        let order: Vec<Range<u32>> = drain(&mut p)
            .into_iter()
            .map(|s| p.layers_of(s).unwrap())
            .collect();
        let starts: Vec<u32> = order.iter().map(|l| l.start).collect();
        assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
    }

    #[test]
    fn window_bounds_in_flight_and_reopens_on_restore() {
        let mut p = FetchPlanner::new(8, vec![groups(8, 1); 4], 3).unwrap();
        let first = drain(&mut p);
        assert_eq!(first.len(), 3);
        assert_eq!(p.poll_request(), None);
        p.handle_received(first[1]).unwrap();
        assert_eq!(p.poll_request(), None, "received is still in flight");
        p.handle_restored(first[1]).unwrap();
        assert_eq!(p.in_flight(), 2);
        assert!(p.poll_request().is_some());
        assert_eq!(p.poll_request(), None);
    }

    #[test]
    fn layers_become_ready_across_all_chunks() {
        let mut p = FetchPlanner::new(4, vec![groups(4, 2); 2], 100).unwrap();
        let all = drain(&mut p);
        // Restore chunk 0 group 0 only: nothing is ready (chunk 1 lacks layers 0..2).
        p.handle_received(all[0]).unwrap();
        p.handle_restored(all[0]).unwrap();
        assert_eq!(p.poll_ready(), None);
        // Group 1 of both chunks before group 0 of chunk 1: layers 2..4 are ready, not 0..2.
        for s in [all[2], all[3]] {
            p.handle_received(s).unwrap();
            p.handle_restored(s).unwrap();
        }
        assert_eq!(p.poll_ready(), Some(2..4));
        assert_eq!(p.poll_ready(), None);
        p.handle_received(all[1]).unwrap();
        p.handle_restored(all[1]).unwrap();
        assert_eq!(p.poll_ready(), Some(0..2));
        assert_eq!(p.poll_ready(), None);
        assert!(p.is_done());
    }

    #[test]
    fn failed_section_is_requested_again_first() {
        let mut p = FetchPlanner::new(2, vec![groups(2, 1); 2], 2).unwrap();
        let a = p.poll_request().unwrap();
        let _b = p.poll_request().unwrap();
        p.handle_failed(a).unwrap();
        assert_eq!(p.poll_request(), Some(a));
    }

    #[test]
    fn rejects_bad_coverage_and_events() {
        assert!(matches!(
            FetchPlanner::new(4, vec![vec![0..2]], 1),
            Err(PlanError::Coverage { .. })
        ));
        assert!(matches!(
            FetchPlanner::new(4, vec![vec![0..2, 1..4]], 1),
            Err(PlanError::Coverage { .. })
        ));
        assert!(matches!(
            FetchPlanner::new(4, vec![vec![0..5]], 1),
            Err(PlanError::BadLayers { .. })
        ));
        let mut p = FetchPlanner::new(2, vec![groups(2, 1)], 1).unwrap();
        let s = SectionRef {
            chunk: 0,
            section: 1,
        };
        assert_eq!(p.handle_restored(s), Err(PlanError::UnexpectedEvent(s)));
        let missing = SectionRef {
            chunk: 9,
            section: 0,
        };
        assert!(p.handle_received(missing).is_err());
    }

    #[test]
    fn empty_fetch_is_done() {
        let mut p = FetchPlanner::new(4, vec![], 4).unwrap();
        assert!(p.is_done());
        assert_eq!(p.poll_request(), None);
        // With no chunks every layer is trivially complete.
        assert_eq!(p.poll_ready(), Some(0..4));
    }
}
