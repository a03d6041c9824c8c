"""The scale-out test bed: hosts as network namespaces inside an outer namespace with no route out."""
