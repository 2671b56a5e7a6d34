/*
 * The test guest's self-checking disk workload, and the host tool that prepares its disk.
 *
 * One static binary, two modes:
 *   workload                      (no arguments; the guest's init execs it) runs forever on
 *                                 /dev/vda, configured from the kernel command line (pgw.*).
 *   workload fill IMAGE SEED START LEN
 *                                 (on the host) writes the seeded pre-boot pattern into
 *                                 [START, START+LEN) of IMAGE.
 *   workload pattern SEED OFFSET  prints the pattern's 64-bit word at OFFSET (for the host's
 *                                 independent check of the recipe).
 *
 * The pre-boot pattern: the little-endian 64-bit word at absolute disk offset o (o a multiple
 * of 8) is splitmix64(seed + o).  The host writes it before boot; the guest, told the seed and
 * the region on its command line, checks part of it every pass (a rotating window), so data that
 * was on the disk before the guest started is verified again and again, wherever the guest runs.
 *
 * The guest's own writes: the work region is split into 4 KiB slots.  Each pass writes
 * `pgw.wpp` slots chosen by a PRNG, each with a fresh generation (content derived from seed,
 * slot and generation), with O_DIRECT, then fdatasync.  The 64-bit checksum of every written
 * slot is kept in this process's memory only, so the expectations travel with a RAM migration.
 * Then every slot written so far is read back (O_DIRECT) and its checksum compared.  A zero
 * region (never written by anyone) is checked to read as zeros.
 *
 * Each pass prints exactly one marker line on the console:
 *   POSTCOPY-GUEST PASS <n> OK written=<slots> preboot_checked_kib=<k> ...
 *   POSTCOPY-GUEST PASS <n> FAIL <what> <where>
 * then sleeps `pgw.pause` milliseconds.  It never stops on its own.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SLOT_SIZE 4096u
#define IO_ALIGN 4096u
#define READ_CHUNK (256u * 1024u)

static uint64_t splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t preboot_word(uint64_t seed, uint64_t offset) { return splitmix64(seed + offset); }

static uint64_t slot_word(uint64_t seed, uint64_t slot, uint64_t generation, uint64_t index)
{
    return splitmix64(splitmix64(seed ^ 0x5107C0DEull) ^ (slot << 20) ^ (generation << 40) ^ index);
}

static uint64_t checksum(const uint64_t *words, size_t count)
{
    uint64_t h = 0x6A09E667F3BCC908ull;
    for (size_t i = 0; i < count; i++)
        h = splitmix64(h ^ words[i]);
    return h;
}

struct config {
    uint64_t seed;
    uint64_t pre_start, pre_len;   /* bytes */
    uint64_t work_start, work_len; /* bytes */
    uint64_t zero_start, zero_len; /* bytes */
    uint64_t writes_per_pass;
    uint64_t preboot_per_pass;     /* bytes */
    uint64_t pause_ms;
    char device[64];
};

static int console_fd = 1;

static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    /* One write per line, so kernel messages cannot split a marker. */
    (void)!write(console_fd, line, (size_t)n);
}

static uint64_t parse_u64(const char *text) { return strtoull(text, NULL, 0); }

static void parse_range_kib(const char *text, uint64_t *start, uint64_t *len)
{
    char *colon = NULL;
    *start = strtoull(text, &colon, 0) * 1024u;
    *len = (colon && *colon == ':') ? strtoull(colon + 1, NULL, 0) * 1024u : 0;
}

static void load_config(struct config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->seed = 1;
    cfg->writes_per_pass = 32;
    cfg->preboot_per_pass = 2u << 20;
    cfg->pause_ms = 200;
    strcpy(cfg->device, "/dev/vda");
    char cmdline[4096] = {0};
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        (void)!read(fd, cmdline, sizeof cmdline - 1);
        close(fd);
    }
    for (char *tok = strtok(cmdline, " \n"); tok; tok = strtok(NULL, " \n")) {
        if (!strncmp(tok, "pgw.seed=", 9))
            cfg->seed = parse_u64(tok + 9);
        else if (!strncmp(tok, "pgw.pre=", 8))
            parse_range_kib(tok + 8, &cfg->pre_start, &cfg->pre_len);
        else if (!strncmp(tok, "pgw.work=", 9))
            parse_range_kib(tok + 9, &cfg->work_start, &cfg->work_len);
        else if (!strncmp(tok, "pgw.zero=", 9))
            parse_range_kib(tok + 9, &cfg->zero_start, &cfg->zero_len);
        else if (!strncmp(tok, "pgw.wpp=", 8))
            cfg->writes_per_pass = parse_u64(tok + 8);
        else if (!strncmp(tok, "pgw.vpp=", 8))
            cfg->preboot_per_pass = parse_u64(tok + 8) * 1024u;
        else if (!strncmp(tok, "pgw.pause=", 10))
            cfg->pause_ms = parse_u64(tok + 10);
        else if (!strncmp(tok, "pgw.dev=", 8))
            snprintf(cfg->device, sizeof cfg->device, "%s", tok + 8);
    }
}

static void sleep_ms(uint64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static int read_exact(int fd, void *buf, size_t len, uint64_t offset)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        done += (size_t)n;
    }
    return 0;
}

static int write_exact(int fd, const void *buf, size_t len, uint64_t offset)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        done += (size_t)n;
    }
    return 0;
}

/* ---- guest mode ------------------------------------------------------------------------- */

struct state {
    uint64_t *expected;   /* checksum of each slot's last write; meaningful where written */
    uint64_t *generation; /* 0: never written */
    uint64_t slot_count;
    uint64_t written_slots;
    uint64_t rng;
    uint64_t preboot_cursor; /* next pre-boot offset (relative) to check */
    uint64_t zero_cursor;
};

static void fill_slot(const struct config *cfg, uint64_t slot, uint64_t gen, uint64_t *words)
{
    for (size_t i = 0; i < SLOT_SIZE / 8; i++)
        words[i] = slot_word(cfg->seed, slot, gen, i);
    words[0] = 0x504757534C4F5400ull; /* "\0TOLSWGP": a readable header in hex dumps */
    words[1] = slot;
    words[2] = gen;
}

/* One pass.  Returns 0 on success; on failure it has printed the FAIL line. */
static int run_pass(const struct config *cfg, struct state *st, int fd, uint64_t pass,
                    uint8_t *buf)
{
    uint64_t *words = (uint64_t *)buf;
    int rc;
    /* 1. write fresh generations to a few slots */
    for (uint64_t w = 0; w < cfg->writes_per_pass && st->slot_count; w++) {
        st->rng = splitmix64(st->rng);
        uint64_t slot = st->rng % st->slot_count;
        uint64_t gen = st->generation[slot] + 1;
        fill_slot(cfg, slot, gen, words);
        uint64_t offset = cfg->work_start + slot * SLOT_SIZE;
        rc = write_exact(fd, buf, SLOT_SIZE, offset);
        if (rc) {
            say("POSTCOPY-GUEST PASS %" PRIu64 " FAIL write-error errno=%d offset=%" PRIu64, pass,
                -rc, offset);
            return -1;
        }
        if (st->generation[slot] == 0)
            st->written_slots++;
        st->generation[slot] = gen;
        st->expected[slot] = checksum(words, SLOT_SIZE / 8);
    }
    if (fdatasync(fd) != 0) {
        say("POSTCOPY-GUEST PASS %" PRIu64 " FAIL fdatasync errno=%d", pass, errno);
        return -1;
    }
    /* 2. read back every slot written so far */
    for (uint64_t base = 0; base < st->slot_count; base += READ_CHUNK / SLOT_SIZE) {
        uint64_t count = st->slot_count - base;
        if (count > READ_CHUNK / SLOT_SIZE)
            count = READ_CHUNK / SLOT_SIZE;
        int any = 0;
        for (uint64_t s = base; s < base + count; s++)
            any |= st->generation[s] != 0;
        if (!any)
            continue;
        uint64_t offset = cfg->work_start + base * SLOT_SIZE;
        rc = read_exact(fd, buf, count * SLOT_SIZE, offset);
        if (rc) {
            say("POSTCOPY-GUEST PASS %" PRIu64 " FAIL read-error errno=%d offset=%" PRIu64, pass,
                -rc, offset);
            return -1;
        }
        for (uint64_t s = base; s < base + count; s++) {
            if (!st->generation[s])
                continue;
            const uint64_t *slot_words = (const uint64_t *)(buf + (s - base) * SLOT_SIZE);
            if (checksum(slot_words, SLOT_SIZE / 8) != st->expected[s]) {
                say("POSTCOPY-GUEST PASS %" PRIu64 " FAIL written-data slot=%" PRIu64
                    " offset=%" PRIu64 " want_gen=%" PRIu64 " found_slot=%" PRIu64
                    " found_gen=%" PRIu64,
                    pass, s, cfg->work_start + s * SLOT_SIZE, st->generation[s], slot_words[1],
                    slot_words[2]);
                return -1;
            }
        }
    }
    /* 3. check a window of the pre-boot pattern */
    uint64_t checked = 0;
    while (cfg->pre_len && checked < cfg->preboot_per_pass) {
        uint64_t rel = st->preboot_cursor;
        uint64_t len = cfg->pre_len - rel;
        if (len > READ_CHUNK)
            len = READ_CHUNK;
        if (len > cfg->preboot_per_pass - checked)
            len = cfg->preboot_per_pass - checked;
        len &= ~(uint64_t)(IO_ALIGN - 1);
        if (!len)
            len = IO_ALIGN;
        uint64_t offset = cfg->pre_start + rel;
        rc = read_exact(fd, buf, len, offset);
        if (rc) {
            say("POSTCOPY-GUEST PASS %" PRIu64 " FAIL read-error errno=%d offset=%" PRIu64, pass,
                -rc, offset);
            return -1;
        }
        for (uint64_t i = 0; i < len / 8; i++) {
            uint64_t want = preboot_word(cfg->seed, offset + i * 8);
            if (words[i] != want) {
                say("POSTCOPY-GUEST PASS %" PRIu64 " FAIL preboot-data offset=%" PRIu64
                    " want=%016" PRIx64 " found=%016" PRIx64,
                    pass, offset + i * 8, want, words[i]);
                return -1;
            }
        }
        checked += len;
        st->preboot_cursor = (rel + len) % cfg->pre_len;
    }
    /* 4. check a window of the zero region */
    if (cfg->zero_len) {
        uint64_t len = cfg->zero_len - st->zero_cursor;
        if (len > READ_CHUNK)
            len = READ_CHUNK;
        uint64_t offset = cfg->zero_start + st->zero_cursor;
        rc = read_exact(fd, buf, len, offset);
        if (rc) {
            say("POSTCOPY-GUEST PASS %" PRIu64 " FAIL read-error errno=%d offset=%" PRIu64, pass,
                -rc, offset);
            return -1;
        }
        for (uint64_t i = 0; i < len / 8; i++) {
            if (words[i]) {
                say("POSTCOPY-GUEST PASS %" PRIu64 " FAIL zero-region offset=%" PRIu64
                    " found=%016" PRIx64,
                    pass, offset + i * 8, words[i]);
                return -1;
            }
        }
        st->zero_cursor = (st->zero_cursor + len) % cfg->zero_len;
    }
    say("POSTCOPY-GUEST PASS %" PRIu64 " OK written_slots=%" PRIu64 " preboot_checked_kib=%" PRIu64
        " preboot_cursor_kib=%" PRIu64,
        pass, st->written_slots, checked / 1024, st->preboot_cursor / 1024);
    return 0;
}

static int guest_main(void)
{
    int fd_console = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (fd_console >= 0)
        console_fd = fd_console;
    struct config cfg;
    load_config(&cfg);
    say("POSTCOPY-GUEST START device=%s seed=%" PRIu64 " pre=%" PRIu64 "+%" PRIu64
        " work=%" PRIu64 "+%" PRIu64 " zero=%" PRIu64 "+%" PRIu64,
        cfg.device, cfg.seed, cfg.pre_start, cfg.pre_len, cfg.work_start, cfg.work_len,
        cfg.zero_start, cfg.zero_len);
    int fd = -1;
    for (int attempt = 0; attempt < 100 && fd < 0; attempt++) {
        fd = open(cfg.device, O_RDWR | O_DIRECT);
        if (fd < 0)
            sleep_ms(100);
    }
    if (fd < 0) {
        say("POSTCOPY-GUEST PASS 0 FAIL open %s errno=%d", cfg.device, errno);
        for (;;)
            sleep_ms(1000);
    }
    struct state st;
    memset(&st, 0, sizeof st);
    st.slot_count = cfg.work_len / SLOT_SIZE;
    st.expected = calloc(st.slot_count ? st.slot_count : 1, sizeof *st.expected);
    st.generation = calloc(st.slot_count ? st.slot_count : 1, sizeof *st.generation);
    st.rng = cfg.seed ^ 0xC0FFEEull;
    uint8_t *buf = NULL;
    if (!st.expected || !st.generation || posix_memalign((void **)&buf, IO_ALIGN, READ_CHUNK)) {
        say("POSTCOPY-GUEST PASS 0 FAIL out-of-memory");
        for (;;)
            sleep_ms(1000);
    }
    for (uint64_t pass = 1;; pass++) {
        run_pass(&cfg, &st, fd, pass, buf);
        sleep_ms(cfg.pause_ms);
    }
}

/* ---- host mode -------------------------------------------------------------------------- */

static int fill_main(const char *image, uint64_t seed, uint64_t start, uint64_t len)
{
    if (start % 8 || len % 8) {
        fprintf(stderr, "fill: START and LEN must be multiples of 8\n");
        return 2;
    }
    int fd = open(image, O_WRONLY);
    if (fd < 0) {
        perror(image);
        return 1;
    }
    static uint64_t words[READ_CHUNK / 8];
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done;
        if (n > READ_CHUNK)
            n = READ_CHUNK;
        for (uint64_t i = 0; i < n / 8; i++)
            words[i] = preboot_word(seed, start + done + i * 8);
        if (write_exact(fd, words, n, start + done)) {
            perror("write");
            return 1;
        }
        done += n;
    }
    if (fsync(fd) != 0) {
        perror("fsync");
        return 1;
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[1], "fill"))
        return fill_main(argv[2], parse_u64(argv[3]), parse_u64(argv[4]), parse_u64(argv[5]));
    if (argc == 4 && !strcmp(argv[1], "pattern")) {
        printf("%016" PRIx64 "\n", preboot_word(parse_u64(argv[2]), parse_u64(argv[3])));
        return 0;
    }
    if (argc == 1)
        return guest_main();
    fprintf(stderr, "usage: %s [fill IMAGE SEED START LEN | pattern SEED OFFSET]\n", argv[0]);
    return 2;
}
