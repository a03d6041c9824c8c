"""CRLs (RFC 5280): built in linear time per issuing CA and published atomically."""
