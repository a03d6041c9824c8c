"""HTTP interfaces: the EST enrollment service (RFC 7030) and the CSMS API, thin over ``ca/``."""
