//! The AD directory client (ldap3): LDAPS/StartTLS, GSSAPI or simple bind, paged searches.
