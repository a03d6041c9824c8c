"""The read-only fleet console: server-rendered pages (Flask, Jinja, CSS; no JavaScript) on the admin listener."""
