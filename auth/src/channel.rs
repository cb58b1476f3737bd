//! The authenticated channel: network filter, TLS 1.3, Kerberos with RFC 9266 channel binding.
