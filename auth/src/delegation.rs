//! Delegation analysis (a pure function of directory facts) and its configuration.
