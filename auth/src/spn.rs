//! Service principal names: parsing, formatting, comparison, and the Samba escaped-twin quirk.
