# Puts the repository root on sys.path so tests import `common`, `rqvae`, ... without installation.
