//! The memory pattern: what each page holds after each pass, and the check of a page before
//! it is overwritten.
//!
//! Pass `p` (from 1) writes into page `i` its pass number in word 0 and `i ^ TAG` in word 1;
//! in full-content mode every other word of the page is also rewritten with a value derived
//! from `p`, `i` and the word's position (so the page changes completely and does not
//! compress). Before pass 0 the buffer is zero. Before writing pass `p` into a page, the
//! writer checks that the page holds exactly pass `p - 1`: a page that lost a write (e.g. a
//! dirty page a live move did not copy) shows an older pass, a page copied to the wrong place
//! shows a wrong index. This is QEMU's migration-test "staircase" checked continuously: at any
//! moment the pages before the writer hold `p`, the rest `p - 1`.

use std::fmt;

/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;
/// 64-bit words per page.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;

/// Mixed into word 1 so that a page of zeros never looks written.
const TAG: u64 = 0x5647_4d45_4d4f_5259; // "VGMEMORY"

/// A page whose content is not what the previous pass wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageMismatch {
    /// The page.
    pub page: u64,
    /// The word that differs.
    pub word: usize,
    /// The pass the page should hold.
    pub expected_pass: u64,
    /// The value expected in that word.
    pub expected: u64,
    /// The value found.
    pub found: u64,
}

impl fmt::Display for PageMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "page {} word {}: expected {:#x} (pass {}), found {:#x}",
            self.page, self.word, self.expected, self.expected_pass, self.found
        )?;
        if self.word == 0 {
            write!(f, " (the page holds pass {})", self.found)?;
        }
        Ok(())
    }
}

/// The value of word `word` of page `page` after pass `pass` (0: before the first pass).
pub fn word_value(pass: u64, page: u64, word: usize, full: bool) -> u64 {
    if pass == 0 {
        return 0;
    }
    match word {
        0 => pass,
        1 => page ^ TAG,
        _ if full => mix(pass ^ page.rotate_left(24) ^ (word as u64).rotate_left(48)),
        _ => 0,
    }
}

/// Writes pass `pass` into page `page`.
pub fn fill_page(words: &mut [u64; PAGE_WORDS], page: u64, pass: u64, full: bool) {
    let n = if full { PAGE_WORDS } else { 2 };
    for (w, slot) in words.iter_mut().enumerate().take(n) {
        *slot = word_value(pass, page, w, full);
    }
}

/// Checks that page `page` holds pass `pass`.
pub fn check_page(
    words: &[u64; PAGE_WORDS],
    page: u64,
    pass: u64,
    full: bool,
) -> Result<(), PageMismatch> {
    let n = if full || pass == 0 { PAGE_WORDS } else { 2 };
    for (w, &found) in words.iter().enumerate().take(n) {
        let expected = word_value(pass, page, w, full);
        if found != expected {
            return Err(PageMismatch {
                page,
                word: w,
                expected_pass: pass,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// splitmix64's finalizer: a cheap, well-spread function of the input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Box<[u64; PAGE_WORDS]> {
        Box::new([0; PAGE_WORDS])
    }

    #[test]
    fn each_pass_checks_against_the_previous_one() {
        for full in [false, true] {
            let mut p = page();
            check_page(&p, 5, 0, full).unwrap();
            for pass in 1..4 {
                check_page(&p, 5, pass - 1, full).unwrap();
                fill_page(&mut p, 5, pass, full);
                check_page(&p, 5, pass, full).unwrap();
            }
        }
    }

    #[test]
    fn a_lost_write_shows_the_older_pass() {
        let mut p = page();
        fill_page(&mut p, 9, 3, false);
        // Pass 4 was lost: the writer, about to write pass 5, expects 4.
        let e = check_page(&p, 9, 4, false).unwrap_err();
        assert_eq!((e.page, e.word, e.expected, e.found), (9, 0, 4, 3));
        assert!(e.to_string().contains("the page holds pass 3"), "{e}");
    }

    #[test]
    fn a_page_copied_to_the_wrong_place_shows_its_index() {
        let mut p = page();
        fill_page(&mut p, 10, 2, false);
        let e = check_page(&p, 11, 2, false).unwrap_err();
        assert_eq!(e.word, 1);
    }

    #[test]
    fn full_content_catches_a_changed_word_anywhere() {
        let mut p = page();
        fill_page(&mut p, 1, 7, true);
        p[300] ^= 1;
        let e = check_page(&p, 1, 7, true).unwrap_err();
        assert_eq!(e.word, 300);
        // Full-content pages differ everywhere from one pass to the next.
        let mut q = page();
        fill_page(&mut q, 1, 8, true);
        assert!(
            p.iter()
                .zip(q.iter())
                .skip(2)
                .filter(|(a, b)| a == b)
                .count()
                < 4
        );
    }

    #[test]
    fn a_written_page_is_not_mistaken_for_a_fresh_one() {
        let mut p = page();
        fill_page(&mut p, 0, 1, false);
        assert!(check_page(&p, 0, 0, false).is_err());
    }
}
