"""Prometheus metrics of the services (docs/metrics.md).

- ``metrics.instruments``: the counters and histograms the serving processes record into (in
  gunicorn's and granian's workers through prometheus_client's multiprocess mode, one directory per
  service under ``<home>/run``), and ``Recorder``, the ``ca.observe.Observer`` that feeds them from
  the core without the core knowing prometheus_client;
- ``metrics.store``: the values read from the store and the publication directory at a scrape
  (expiring certificates, lockouts, campaigns, OCSP and CRL freshness), cached briefly;
- ``metrics.listener``: the loopback listener of each service, in a process (``serve est``,
  ``serve ocsp``: ``metrics.exporter``) or a thread (``crl publish --watch``) of its own, so a slow
  scrape never holds a request worker.

Like ``ocsp/`` and ``crl/`` it sits above the core and never imports Flask or click.
"""
