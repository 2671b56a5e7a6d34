/* postcopy fastpath: an nbdkit filter that serves reads of PRESENT data in C.
 *
 * How it works.  `postcopy receive` puts this filter in front of the python plugin.  The engine
 * (postcopy/destination/blockmap.py) keeps its block map, one byte per chunk, in a MAP_SHARED
 * memory map of the file `live.map` in the state directory.  This filter maps the same file read-only in
 * .after_fork (the engine created it in the plugin's .config_complete, which runs first) and opens
 * the destination file O_RDONLY.  Its .pread checks the PRESENT bit (bit 0) of every chunk the
 * request touches: when all are set it pread()s the bytes straight from the destination file and
 * never enters Python; otherwise (or on any local read error) it hands the request to the plugin
 * (next->pread), which fetches the missing chunks from the source.  Every other callback passes
 * through (the filter default), and the plugin's PARALLEL thread model is kept.
 *
 * Why a PRESENT bit seen here means complete data.  The engine sets a chunk's PRESENT bit only
 * after the system call that wrote the chunk's data (pwrite, or fallocate for holes) has
 * returned, and never clears bits; the data and the bit are then ordered like a release/acquire
 * pair:
 *   writer (the engine, postcopy/engine.py `_mark_present`): the data system call's stores into
 *     the page cache; a release fence; the PRESENT store into its MAP_SHARED mapping.  The fence
 *     is C11 atomic_thread_fence(memory_order_release) from libatomic on weakly ordered CPUs
 *     (arm64, POWER, RISC-V: a system call return is no barrier there); on x86 it is a no-op
 *     because TSO never reorders a store with older stores.  Without libatomic on such a CPU the
 *     engine refuses to start.
 *   reader (here, `all_present`): an acquire load of each map byte, then pread(), whose page cache
 *     loads cannot move before the acquire load (nor can the compiler hoist the call).
 * Both mappings are of the same page cache pages, so the acquire load that reads the PRESENT
 * byte synchronizes with the release fence before it, and pread() sees the data written before
 * it.  A chunk the bit does not show yet is simply handed to the plugin.
 *
 * Parameters: fastpath-map=PATH (the live map), fastpath-file=PATH (the destination file),
 * fastpath-shift=N (log2 of the chunk size), fastpath-stats=PATH (optional: at exit, write
 * "hits H misses M" there, H reads served here and M handed to the plugin).
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#define PRESENT_BIT 0x01

static char *map_path;
static char *file_path;
static char *stats_path;
static unsigned chunk_shift;
static int have_shift;

static const unsigned char *live_map; /* NULL: every read goes to the plugin */
static uint64_t live_map_chunks;
static int file_fd = -1;

static uint64_t hits;   /* updated with relaxed atomics: only for the stats line */
static uint64_t misses;

static void
fastpath_unload (void)
{
  if (live_map != NULL)
    munmap ((void *) live_map, live_map_chunks);
  if (file_fd >= 0)
    close (file_fd);
  free (map_path);
  free (file_path);
  free (stats_path);
}

static int
fastpath_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                 const char *key, const char *value)
{
  char **target = NULL;

  if (strcmp (key, "fastpath-map") == 0)
    target = &map_path;
  else if (strcmp (key, "fastpath-file") == 0)
    target = &file_path;
  else if (strcmp (key, "fastpath-stats") == 0)
    target = &stats_path;
  else if (strcmp (key, "fastpath-shift") == 0) {
    if (nbdkit_parse_unsigned ("fastpath-shift", value, &chunk_shift) == -1)
      return -1;
    if (chunk_shift < 9 || chunk_shift > 40) {
      nbdkit_error ("fastpath-shift %u is out of range (9..40)", chunk_shift);
      return -1;
    }
    have_shift = 1;
    return 0;
  }
  else
    return next (nxdata, key, value);

  free (*target);
  *target = nbdkit_absolute_path (value);
  return *target == NULL ? -1 : 0;
}

static int
fastpath_config_complete (nbdkit_next_config_complete *next,
                          nbdkit_backend *nxdata)
{
  if (map_path == NULL || file_path == NULL || !have_shift) {
    nbdkit_error ("fastpath needs fastpath-map, fastpath-file and fastpath-shift");
    return -1;
  }
  return next (nxdata);
}

#define fastpath_config_help \
  "fastpath-map=<PATH>    (required) the engine's live block map.\n" \
  "fastpath-file=<PATH>   (required) the destination file.\n" \
  "fastpath-shift=<N>     (required) log2 of the chunk size.\n" \
  "fastpath-stats=<PATH>  write hit and miss counts there at exit."

/* Runs after the plugin's .config_complete, where the engine published the live map. */
static int
fastpath_after_fork (nbdkit_backend *nxdata)
{
  struct stat st;
  int map_fd;
  void *mapped;

  file_fd = open (file_path, O_RDONLY | O_CLOEXEC);
  if (file_fd == -1) {
    nbdkit_error ("fastpath: open %s: %m", file_path);
    return -1;
  }
  if (fstat (file_fd, &st) == -1) {
    nbdkit_error ("fastpath: fstat %s: %m", file_path);
    return -1;
  }
  if (st.st_size == 0) {
    /* An empty disk: the engine publishes no live map (nothing to map, nothing to serve). */
    nbdkit_debug ("fastpath: %s is empty: every request goes to the plugin", file_path);
    return 0;
  }
  map_fd = open (map_path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (map_fd == -1) {
    nbdkit_error ("fastpath: open %s: %m", map_path);
    return -1;
  }
  if (fstat (map_fd, &st) == -1) {
    nbdkit_error ("fastpath: fstat %s: %m", map_path);
    close (map_fd);
    return -1;
  }
  if (!S_ISREG (st.st_mode)) {
    nbdkit_error ("fastpath: %s is not a regular file", map_path);
    close (map_fd);
    return -1;
  }
  if (st.st_size == 0) {          /* an empty disk: nothing to serve here */
    close (map_fd);
    return 0;
  }
  mapped = mmap (NULL, st.st_size, PROT_READ, MAP_SHARED, map_fd, 0);
  close (map_fd);
  if (mapped == MAP_FAILED) {
    nbdkit_error ("fastpath: mmap %s: %m", map_path);
    return -1;
  }
  live_map_chunks = st.st_size;
  live_map = mapped;
  nbdkit_debug ("fastpath: serving present chunks of %s (%" PRIu64 " chunks of %u bytes)",
                file_path, live_map_chunks, 1u << chunk_shift);
  return 0;
}

static void
fastpath_cleanup (nbdkit_backend *nxdata)
{
  uint64_t h = __atomic_load_n (&hits, __ATOMIC_RELAXED);
  uint64_t m = __atomic_load_n (&misses, __ATOMIC_RELAXED);
  int fd;

  nbdkit_debug ("fastpath: hits %" PRIu64 " misses %" PRIu64, h, m);
  if (stats_path == NULL)
    return;
  fd = open (stats_path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd == -1) {
    nbdkit_debug ("fastpath: cannot write %s: %m", stats_path);
    return;
  }
  dprintf (fd, "hits %" PRIu64 " misses %" PRIu64 "\n", h, m);
  close (fd);
}

/* Are all chunks of [offset, offset+count) present?  count > 0. */
static int
all_present (uint32_t count, uint64_t offset)
{
  uint64_t chunk = offset >> chunk_shift;
  uint64_t last = (offset + count - 1) >> chunk_shift;

  if (live_map == NULL || last >= live_map_chunks)
    return 0;
  /* Acquire loads: the data reads after them cannot be moved before them (see the top). */
  for (; chunk <= last; chunk++)
    if (!(__atomic_load_n (&live_map[chunk], __ATOMIC_ACQUIRE) & PRESENT_BIT))
      return 0;
  return 1;
}

/* pread the whole range from the destination file; 0 on success, -1 on any failure. */
static int
read_local (void *buf, uint32_t count, uint64_t offset)
{
  char *p = buf;

  while (count > 0) {
    ssize_t r = pread (file_fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0)                   /* the file shrank: let the plugin decide */
      return -1;
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

static int
fastpath_pread (nbdkit_next *next, void *handle, void *buf, uint32_t count,
                uint64_t offset, uint32_t flags, int *err)
{
  if (count > 0 && all_present (count, offset) && read_local (buf, count, offset) == 0) {
    __atomic_fetch_add (&hits, 1, __ATOMIC_RELAXED);
    return 0;
  }
  __atomic_fetch_add (&misses, 1, __ATOMIC_RELAXED);
  return next->pread (next, buf, count, offset, flags, err);
}

static struct nbdkit_filter filter = {
  .name              = "postcopy-fastpath",
  .longname          = "postcopy fast path for reads of present data",
  .unload            = fastpath_unload,
  .config            = fastpath_config,
  .config_complete   = fastpath_config_complete,
  .config_help       = fastpath_config_help,
  .after_fork        = fastpath_after_fork,
  .cleanup           = fastpath_cleanup,
  .pread             = fastpath_pread,
};

NBDKIT_REGISTER_FILTER (filter)
