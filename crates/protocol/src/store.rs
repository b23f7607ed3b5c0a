//! Single-use bookkeeping shared by both sessions: material filed under an id,
//! one slot per op, each slot taken at most once, ids never accepted twice.

use std::collections::{HashMap, HashSet};

use crate::{OpId, PreprocessingId, ProtocolError};

#[derive(Debug)]
pub(crate) struct SingleUseStore<T> {
    live: HashMap<PreprocessingId, Vec<Option<T>>>,
    /// Ids whose material is gone (all taken, or retired). Kept so that a late
    /// second use is reported as reuse, not as an unknown id, and so that an id
    /// can never be filled again.
    spent: HashSet<PreprocessingId>,
}

impl<T> SingleUseStore<T> {
    pub(crate) fn new() -> Self {
        SingleUseStore {
            live: HashMap::new(),
            spent: HashSet::new(),
        }
    }

    pub(crate) fn insert(
        &mut self,
        id: PreprocessingId,
        slots: Vec<T>,
    ) -> Result<(), ProtocolError> {
        if self.live.contains_key(&id) || self.spent.contains(&id) {
            return Err(ProtocolError::DuplicateId(id));
        }
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
            out.push(slot);
            if slots.iter().all(Option::is_none) {
                self.retire(id);
            }
        }
        Ok(out)
    }

    /// Drops whatever is left under `id`; the id stays spent.
    pub(crate) fn retire(&mut self, id: PreprocessingId) {
        self.live.remove(&id);
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
