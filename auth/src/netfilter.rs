//! The incoming-network filter (CIDR lists or any network), applied before TLS.
