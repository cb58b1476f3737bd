//! Authorization of an authenticated peer: a local principal list or (recursive) AD group membership.
