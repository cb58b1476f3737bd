//! Dirty page bitmaps over the dense page index of guest RAM.

/// One bit per guest RAM page (dense page index, see [`super::layout::MemoryLayout`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// A clean bitmap for `pages` pages.
    pub fn new(pages: u64) -> DirtyBitmap {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        DirtyBitmap {
            words: vec![0; words],
            pages,
        }
    }

    /// A bitmap with every page set.
    pub fn all(pages: u64) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(pages);
        for w in &mut b.words {
            *w = u64::MAX;
        }
        b.trim();
        b
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The raw words (bit `i % 64` of word `i / 64` is page `i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether page `index` is set (false past the end).
    pub fn is_set(&self, index: u64) -> bool {
        usize::try_from(index / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// Sets page `index` (ignored past the end).
    pub fn set(&mut self, index: u64) {
        if index >= self.pages {
            return;
        }
        if let Some(w) = usize::try_from(index / 64)
            .ok()
            .and_then(|w| self.words.get_mut(w))
        {
            *w |= 1 << (index % 64);
        }
    }

    /// Clears page `index`.
    pub fn clear(&mut self, index: u64) {
        if let Some(w) = usize::try_from(index / 64)
            .ok()
            .and_then(|w| self.words.get_mut(w))
        {
            *w &= !(1 << (index % 64));
        }
    }

    /// ORs `words` (a KVM or vm-memory bitmap of a slot) in at page `first_page`, which must
    /// be a multiple of 64. Bits past the end are ignored.
    pub fn or_words_at(&mut self, first_page: u64, words: &[u64]) {
        debug_assert_eq!(first_page % 64, 0, "slots start on 64-page boundaries");
        let Ok(start) = usize::try_from(first_page / 64) else {
            return;
        };
        for (dst, src) in self.words.iter_mut().skip(start).zip(words) {
            *dst |= *src;
        }
        self.trim();
    }

    /// ORs another bitmap of the same size into this one.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (dst, src) in self.words.iter_mut().zip(&other.words) {
            *dst |= *src;
        }
    }

    /// Number of pages set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The set page indices, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        iter_words(&self.words, 0)
    }

    /// Builds a bitmap from raw words (bits past `pages` are dropped).
    pub fn from_words(pages: u64, mut words: Vec<u64>) -> DirtyBitmap {
        words.resize(usize::try_from(pages.div_ceil(64)).unwrap_or(0), 0);
        let mut b = DirtyBitmap { words, pages };
        b.trim();
        b
    }

    fn trim(&mut self) {
        let rem = self.pages % 64;
        if rem == 0 {
            return;
        }
        if let Some(last) = self.words.last_mut() {
            *last &= (1u64 << rem) - 1;
        }
    }
}

/// The set bits of `words` as page indices, bit `b` of word `i` being page `base + 64 i + b`.
pub fn iter_words(words: &[u64], base: u64) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(move |(wi, &w)| {
        let at = base + (wi as u64) * 64;
        BitIter(w).map(move |b| at + u64::from(b))
    })
}

struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_iter_count() {
        let mut b = DirtyBitmap::new(130);
        b.set(0);
        b.set(64);
        b.set(129);
        b.set(130); // past the end: ignored
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert_eq!(b.count(), 3);
        b.clear(64);
        assert!(!b.is_set(64));
        assert!(b.is_set(129));
        assert_eq!(DirtyBitmap::all(130).count(), 130);
    }

    #[test]
    fn or_words_at_offsets_and_trims() {
        let mut b = DirtyBitmap::new(100);
        b.or_words_at(64, &[u64::MAX, u64::MAX]);
        assert_eq!(b.count(), 36);
        assert!(b.is_set(99));
        assert!(!b.is_set(63));
    }
}
