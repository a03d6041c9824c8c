"""OCSP (RFC 6960 / RFC 5019): responses signed ahead of time, served by a keyless responder."""
