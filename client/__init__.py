"""The `peertrain` command-line client: it speaks to the API over HTTP only, so it installs alone on a laptop."""
