//! How a command reaches the directory: flags and `VMGATE_LDAP_*` variables.
