//! Kerberos through GSSAPI: credentials from explicit keytabs and caches, contexts, S4U.
