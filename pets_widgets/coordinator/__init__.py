"""The analyst's side: the Federation that carries a query from the enclave to the sites and
back, configuration files, site backends and progress. It never holds a private key, a row or
a plaintext aggregate."""
