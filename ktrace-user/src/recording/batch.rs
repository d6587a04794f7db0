//! A block read back for batch processing: its events side by side (the
//! engine takes them as a slice, `Engine::process_batch`), the other items
//! with their place among them, and the warnings met reading it. Batches
//! are reused block after block: reading one allocates nothing once the
//! vectors have grown to a block's size.

use crate::event::Event;

use super::format::Item;
use super::warning::Warning;

/// Where a reader puts what it decodes.
pub(super) trait Items {
    fn push_item(&mut self, item: Item);
}

impl Items for Vec<Item> {
    #[inline]
    fn push_item(&mut self, item: Item) {
        self.push(item);
    }
}

/// One block's items, in the order recorded.
#[derive(Debug, Default)]
pub struct Batch {
    /// The events, in order.
    pub events: Vec<Event>,
    /// The other items (ticks, lost lines, names), each with the number of
    /// events before it.
    pub others: Vec<(usize, Item)>,
    /// What reading this block (and the bytes skipped before it) warned of:
    /// said before its items are handled.
    pub warnings: Vec<Warning>,
}

/// A stretch of a [`Batch`]: events in a row, or another item.
#[derive(Debug, Clone, Copy)]
pub enum Part<'a> {
    Events(&'a [Event]),
    Item(&'a Item),
}

impl Items for Batch {
    #[inline]
    fn push_item(&mut self, item: Item) {
        match item {
            Item::Event(e) => self.events.push(e),
            other => self.others.push((self.events.len(), other)),
        }
    }
}

impl Batch {
    pub fn clear(&mut self) {
        self.events.clear();
        self.others.clear();
        self.warnings.clear();
    }

    /// Items (events and others).
    pub fn len(&self) -> usize {
        self.events.len() + self.others.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch in recorded order: runs of events and the items between them.
    pub fn parts(&self) -> impl Iterator<Item = Part<'_>> {
        let mut at = 0;
        let mut others = self.others.iter().peekable();
        std::iter::from_fn(move || {
            let end = others.peek().map_or(self.events.len(), |(i, _)| *i);
            if at < end {
                let run = &self.events[at..end];
                at = end;
                return Some(Part::Events(run));
            }
            others.next().map(|(_, item)| Part::Item(item))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventBody, ResetCounts, Source};

    fn ev(ts_ns: u64) -> Item {
        Item::Event(Event {
            ts_ns,
            netns: 1,
            source: Source::Tracepoint,
            body: EventBody::ResetsSummarised(ResetCounts::default()),
        })
    }

    /// What `parts` gives back, as timestamps: events in runs, ticks alone.
    fn shape(items: Vec<Item>) -> Vec<Vec<u64>> {
        let mut b = Batch::default();
        items.into_iter().for_each(|i| b.push_item(i));
        b.parts()
            .map(|p| match p {
                Part::Events(evs) => evs.iter().map(|e| e.ts_ns).collect(),
                Part::Item(i) => vec![1000 + i.ts_ns()],
            })
            .collect()
    }

    #[test]
    fn parts_keep_the_recorded_order() {
        let tick = |ts_ns| Item::Tick { ts_ns };
        assert_eq!(
            shape(vec![tick(0), ev(1), ev(2), tick(3), tick(4), ev(5)]),
            vec![vec![1000], vec![1, 2], vec![1003], vec![1004], vec![5]]
        );
        assert_eq!(shape(vec![ev(1), ev(2)]), vec![vec![1, 2]]);
        assert_eq!(shape(vec![ev(1), tick(2)]), vec![vec![1], vec![1002]]);
        assert!(shape(vec![]).is_empty());
    }
}
