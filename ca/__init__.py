"""chargepki CA core: configuration, PKCS#11 token, store, profiles, issuance, revocation, audit.

Framework-free on purpose: nothing here imports Flask or click, so the CLI, the EST
service and the tests all drive the same functions with explicit sessions and signers.
"""
