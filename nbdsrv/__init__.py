"""nbdsrv: the NBD protocol (sans-IO core), a trio server and a trio client."""
