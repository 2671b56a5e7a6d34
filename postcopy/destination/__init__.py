"""Host B, the lazy destination: `receive` starts nbdkit with the plugin, whose `engine` serves the
guest from the local file and fetches what is missing over `links` (nbdsrv clients); `blockmap`
records which chunks are local, `ratelimit` paces the drain, `gate` is the source-frozen flag and
`status` the file `fetch-progress` reads.  See ARCHITECTURE.md."""
