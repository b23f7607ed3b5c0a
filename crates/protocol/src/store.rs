//! Single-use bookkeeping shared by both sessions: material filed under an id,
//! one slot per op, each slot taken at most once, ids never accepted twice.
//! The store keeps a running count of the bytes it holds, so that a server
//! can charge a session's stored material against its memory budget.

use std::collections::{HashMap, HashSet};

use crate::{OpId, PreprocessingId, ProtocolError};

#[derive(Debug)]
pub(crate) struct SingleUseStore<T> {
    live: HashMap<PreprocessingId, Vec<Option<T>>>,
    /// Ids whose material is gone (all taken, or retired). Kept so that a late
    /// second use is reported as reuse, not as an unknown id, and so that an id
    /// can never be filled again.
    spent: HashSet<PreprocessingId>,
    /// bytes of the slots in `live`
    held: usize,
}

/// Heap bytes a stored slot takes.
pub(crate) trait Weigh {
    fn bytes(&self) -> usize;
}

impl Weigh for Vec<u64> {
    fn bytes(&self) -> usize {
        self.len() * 8
    }
}

impl Weigh for (Vec<u64>, Vec<u64>) {
    fn bytes(&self) -> usize {
        (self.0.len() + self.1.len()) * 8
    }
}

/// Bytes an id costs besides its slots' contents: a `live` entry with its
/// slot vector, then a `spent` entry (generous for hash-table overhead).
const PER_ID_BYTES: usize = 96;
/// Bytes each op's slot header costs.
const PER_SLOT_BYTES: usize = 32;

impl<T: Weigh> SingleUseStore<T> {
    pub(crate) fn new() -> Self {
        SingleUseStore {
            live: HashMap::new(),
            spent: HashSet::new(),
            held: 0,
        }
    }

    /// Bytes held: the live slots' contents and headers, and every id
    /// ever filed (spent ids are remembered to refuse reuse).
    pub(crate) fn bytes(&self) -> usize {
        self.held + (self.live.len() + self.spent.len()) * PER_ID_BYTES
    }

    pub(crate) fn insert(
        &mut self,
        id: PreprocessingId,
        slots: Vec<T>,
    ) -> Result<(), ProtocolError> {
        if self.live.contains_key(&id) || self.spent.contains(&id) {
            return Err(ProtocolError::DuplicateId(id));
        }
        self.held += slots
            .iter()
            .map(|t| t.bytes() + PER_SLOT_BYTES)
            .sum::<usize>();
        self.live.insert(id, slots.into_iter().map(Some).collect());
        Ok(())
    }

    /// Checks that every id is distinct and has an unused slot for `op`,
    /// without consuming anything.
    pub(crate) fn check(&self, ids: &[PreprocessingId], op: OpId) -> Result<(), ProtocolError> {
        let mut seen = HashSet::with_capacity(ids.len());
        for &id in ids {
            if !seen.insert(id) {
                return Err(ProtocolError::RepeatedIdInRequest(id));
            }
            match self.live.get(&id) {
                Some(slots) => match slots.get(op as usize) {
                    Some(Some(_)) => {}
                    Some(None) => return Err(ProtocolError::Reused { id, op }),
                    None => return Err(ProtocolError::UnknownOp(op)),
                },
                None if self.spent.contains(&id) => return Err(ProtocolError::Reused { id, op }),
                None => return Err(ProtocolError::UnknownId(id)),
            }
        }
        Ok(())
    }

    /// Takes the slots of `op` for all `ids`; call [`check`](Self::check) first.
    pub(crate) fn take(
        &mut self,
        ids: &[PreprocessingId],
        op: OpId,
    ) -> Result<Vec<T>, ProtocolError> {
        self.check(ids, op)?;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let slots = self.live.get_mut(&id).ok_or(ProtocolError::UnknownId(id))?;
            let slot = slots
                .get_mut(op as usize)
                .and_then(Option::take)
                .ok_or(ProtocolError::Reused { id, op })?;
            self.held -= slot.bytes();
            out.push(slot);
            if slots.iter().all(Option::is_none) {
                self.retire(id);
            }
        }
        Ok(out)
    }

    /// Drops whatever is left under `id`; the id stays spent.
    pub(crate) fn retire(&mut self, id: PreprocessingId) {
        if let Some(slots) = self.live.remove(&id) {
            self.held -= slots
                .iter()
                .map(|s| s.as_ref().map_or(0, Weigh::bytes) + PER_SLOT_BYTES)
                .sum::<usize>();
        }
        self.spent.insert(id);
    }

    /// Number of ids with material still held.
    /// Whether `id` was ever filed here.
    pub(crate) fn known(&self, id: PreprocessingId) -> bool {
        self.live.contains_key(&id) || self.spent.contains(&id)
    }

    pub(crate) fn live(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte count follows every way material enters and leaves: filed,
    /// taken slot by slot, retired with slots left; spent ids stay counted
    /// (they are remembered), nothing else does.
    #[test]
    fn bytes_follow_material_in_and_out() {
        let mut store = SingleUseStore::<Vec<u64>>::new();
        assert_eq!(store.bytes(), 0);
        let ids = [PreprocessingId(1), PreprocessingId(2)];
        for id in ids {
            store.insert(id, vec![vec![7; 100], vec![9; 10]]).unwrap();
        }
        let per_id = 110 * 8 + 2 * PER_SLOT_BYTES + PER_ID_BYTES;
        assert_eq!(store.bytes(), 2 * per_id);
        let taken = store.take(&ids[..1], 0).unwrap();
        assert_eq!(taken, vec![vec![7; 100]]);
        assert_eq!(store.bytes(), 2 * per_id - 800);
        store.take(&ids[..1], 1).unwrap();
        store.retire(ids[1]);
        assert_eq!(store.bytes(), 2 * PER_ID_BYTES);
        // a refused reuse changes nothing
        assert!(store.take(&ids[..1], 0).is_err());
        assert_eq!(store.bytes(), 2 * PER_ID_BYTES);
    }
}
