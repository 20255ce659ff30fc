/* memcheck: a bare-metal guest that checks its own memory, for live-migration soaks.
 *
 * It fills a working set of pages above MEMCHECK_BASE with content derived from each page's
 * index and generation, rewrites pages at a set rate (each rewrite bumps that page's
 * generation), and verifies every page on every pass. Whatever a migration loses (a dirty
 * page not resent, a page from the wrong place, a torn page) shows up as a page whose
 * content is not what its index and generation say it must be.
 *
 * Which generation a page must have is never stored: the k-th rewrite goes to page
 * (k * stride) mod N, so the number of rewrites so far (cycle, cursor) gives every page's
 * generation. The only state besides the pages is a few words that change on every rewrite.
 *
 * It reports on COM1 (a file on the host, wherever the guest runs) at least once a second,
 * one line of key=value fields (see report()); errors are sticky: once seen, a count and the
 * first bad page stay in every report until the guest restarts. Between passes it halts
 * until the timer (PIT, MEMCHECK_HZ) wakes it, so an idle guest costs its host almost nothing.
 *
 * Options come from the multiboot command line (libvirt <cmdline>, QEMU -append):
 *   mib=N          working set in MiB (default: the memory above MEMCHECK_BASE, less 1 MiB)
 *   dirty_mib_s=R  rewrite R MiB of pages per second (default 0: idle but full of data)
 *   pass_ms=T      start a verify pass every T ms (default 1000)
 *   report_ms=T    report every T ms at least (default 1000)
 *   tlb_flush=0|1  flush the TLB every tick and every FLUSH_STRIDE pages (default 1)
 *
 * Why the TLB flush: QEMU's TCG before 9.0 (upstream commit 03bfc2188f, "physmem: Fix
 * migration dirty bitmap coherency with TCG memory access") does not reset its software TLB
 * when a migration's dirty-bitmap sync clears a page's bit, so stores through a TLB entry
 * filled earlier are not tracked and never resent: the destination gets a stale page. A
 * guest that never flushes its TLB (this one: no paging, no context switches) keeps such
 * entries for its stack and loses itself on a few migrations in ten. Flushing often (a
 * CR4.PGE toggle; with paging off nothing else changes) shrinks that window to milliseconds:
 * the guest then survives and what is still lost shows in its working set, as errors.
 * tlb_flush=0 shows the bug as it is.
 */
#include <stdint.h>

#define MEMCHECK_BASE (4u << 20)
#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / 4u)
#define PAGES_PER_MIB 256u
#define MEMCHECK_HZ 50u
#define MS_PER_TICK (1000u / MEMCHECK_HZ)
#define PIT_HZ 1193182u
/* how many pages a long loop touches between two TLB flushes (see tlb_flush=) */
#define FLUSH_STRIDE 64u
/* the golden-ratio increment that spreads words within a page */
#define WORD_STEP 0x9E3779B9u

/* ---------------------------------------------------------------------------- I/O */

static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

#define COM1 0x3F8

static void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* no interrupts: we poll */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xC7); /* FIFO on, cleared */
}

static void put_char(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) {
    }
    outb(COM1, (uint8_t)c);
}

/* A report is built in a buffer first, then sent whole: one line, never interleaved. */
struct line {
    char text[320];
    uint32_t len;
};

static void add_str(struct line *l, const char *s)
{
    while (*s && l->len < sizeof l->text - 2) {
        l->text[l->len++] = *s++;
    }
}

static void add_u32(struct line *l, uint32_t v)
{
    char digits[11];
    int i = 10;
    digits[i] = 0;
    do {
        digits[--i] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v);
    add_str(l, digits + i);
}

static void add_hex(struct line *l, uint32_t v)
{
    static const char hex[] = "0123456789abcdef";
    char digits[11] = "0x";
    for (int i = 0; i < 8; i++) {
        digits[2 + i] = hex[(v >> (28 - 4 * i)) & 0xFu];
    }
    digits[10] = 0;
    add_str(l, digits);
}

static void add_field(struct line *l, const char *key, uint32_t v)
{
    add_str(l, " ");
    add_str(l, key);
    add_str(l, "=");
    add_u32(l, v);
}

/* The status also goes to the first row of the VGA text screen (what a SPICE viewer shows). */
static void show_on_screen(const struct line *l)
{
    volatile uint16_t *screen = (volatile uint16_t *)0xB8000;
    for (uint32_t i = 0; i < 80; i++) {
        char c = i < l->len ? l->text[i] : ' ';
        screen[i] = (uint16_t)(0x0700u | (uint8_t)c);
    }
}

static void send(struct line *l, int screen)
{
    if (screen) {
        show_on_screen(l);
    }
    l->text[l->len++] = '\n';
    for (uint32_t i = 0; i < l->len; i++) {
        put_char(l->text[i]);
    }
}

/* ---------------------------------------------------------------------------- time */

volatile uint32_t memcheck_ticks;

extern void timer_stub(void);
extern void irq_master_stub(void);
extern void irq_slave_stub(void);
extern void (*const fault_stubs[32])(void);

struct idt_entry {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t zero;
    uint8_t type;
    uint16_t offset_high;
} __attribute__((packed));

static struct idt_entry idt[48];

static void set_gate(uint32_t vector, void (*handler)(void))
{
    uint32_t address = (uint32_t)handler;
    idt[vector].offset_low = (uint16_t)address;
    idt[vector].selector = 0x08;
    idt[vector].zero = 0;
    idt[vector].type = 0x8E; /* present, ring 0, 32-bit interrupt gate */
    idt[vector].offset_high = (uint16_t)(address >> 16);
}

static void interrupts_init(void)
{
    for (uint32_t v = 0; v < 32; v++) {
        set_gate(v, fault_stubs[v]);
    }
    set_gate(32, timer_stub);
    for (uint32_t v = 33; v < 40; v++) {
        set_gate(v, irq_master_stub);
    }
    for (uint32_t v = 40; v < 48; v++) {
        set_gate(v, irq_slave_stub);
    }
    struct {
        uint16_t limit;
        uint32_t base;
    } __attribute__((packed)) descriptor = {sizeof idt - 1, (uint32_t)idt};
    __asm__ volatile("lidt %0" : : "m"(descriptor));

    /* 8259 PICs: IRQ0..15 -> vectors 32..47, only the timer unmasked */
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 32);
    outb(0xA1, 40);
    outb(0x21, 0x04);
    outb(0xA1, 0x02);
    outb(0x21, 0x01);
    outb(0xA1, 0x01);
    outb(0x21, 0xFE);
    outb(0xA1, 0xFF);

    /* PIT channel 0, rate generator at MEMCHECK_HZ */
    uint32_t divisor = PIT_HZ / MEMCHECK_HZ;
    outb(0x43, 0x34);
    outb(0x40, (uint8_t)divisor);
    outb(0x40, (uint8_t)(divisor >> 8));
    __asm__ volatile("sti");
}

static inline uint32_t now_ticks(void)
{
    return memcheck_ticks;
}

/* See tlb_flush= in the header: toggling CR4.PGE flushes the whole TLB (needs CPUID PGE). */
static uint32_t tlb_flush_on;

static void flush_tlb(void)
{
    if (!tlb_flush_on) {
        return;
    }
    uint32_t cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4 ^ 0x80u) : "memory");
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4) : "memory");
}

static int cpu_has_pge(void)
{
    uint32_t eax = 1, ebx, ecx, edx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx));
    return (edx >> 13) & 1u;
}

/* Sleep until the next timer tick: "sti; hlt" cannot miss a tick that comes in between. */
static void wait_for_tick(void)
{
    uint32_t seen = now_ticks();
    for (;;) {
        __asm__ volatile("cli");
        if (now_ticks() != seen) {
            __asm__ volatile("sti");
            flush_tlb();
            return;
        }
        __asm__ volatile("sti; hlt");
    }
}

/* ---------------------------------------------------------------------------- options */

struct options {
    uint32_t mib;
    uint32_t dirty_mib_s;
    uint32_t pass_ms;
    uint32_t report_ms;
    uint32_t tlb_flush;
    uint32_t unknown;
};

static int starts_with(const char *s, const char *prefix)
{
    while (*prefix) {
        if (*s++ != *prefix++) {
            return 0;
        }
    }
    return 1;
}

/* The number after "key=": digits only; a bad value leaves *out untouched and returns 0. */
static int parse_u32(const char *s, uint32_t *out)
{
    uint32_t v = 0;
    int digits = 0;
    while (*s >= '0' && *s <= '9') {
        if (v > 400000000u) {
            return 0;
        }
        v = v * 10u + (uint32_t)(*s++ - '0');
        digits++;
    }
    if (!digits || (*s && *s != ' ')) {
        return 0;
    }
    *out = v;
    return 1;
}

static void parse_options(const char *cmdline, struct options *o)
{
    static const char *const keys[] = {"mib=", "dirty_mib_s=", "pass_ms=", "report_ms=", "tlb_flush="};
    uint32_t *const values[] = {&o->mib, &o->dirty_mib_s, &o->pass_ms, &o->report_ms, &o->tlb_flush};
    const char *s = cmdline;
    int first = 1;
    while (*s) {
        while (*s == ' ') {
            s++;
        }
        if (!*s) {
            break;
        }
        int known = 0;
        for (uint32_t k = 0; k < 5; k++) {
            const char *key = keys[k];
            if (starts_with(s, key)) {
                const char *p = s;
                while (*key++) {
                    p++;
                }
                known = parse_u32(p, values[k]);
            }
        }
        /* QEMU puts the image's path first; anything else unknown is counted */
        if (!known && !first) {
            o->unknown++;
        }
        first = 0;
        while (*s && *s != ' ') {
            s++;
        }
    }
}

/* ---------------------------------------------------------------------------- pages */

static inline uint32_t mix(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

static uint32_t boot_salt;

/* Word 0 holds the page's index, word 1 its generation, the rest follow from both. */
static inline uint32_t page_seed(uint32_t page, uint32_t gen)
{
    return mix(page * 0x85EBCA6Bu ^ mix(gen + boot_salt));
}

static inline uint32_t *page_at(uint32_t page)
{
    return (uint32_t *)(MEMCHECK_BASE + page * PAGE_BYTES);
}

static void write_page(uint32_t page, uint32_t gen)
{
    uint32_t *w = page_at(page);
    uint32_t v = page_seed(page, gen);
    w[0] = page;
    w[1] = gen;
    for (uint32_t i = 2; i < PAGE_WORDS; i++) {
        w[i] = v;
        v += WORD_STEP;
    }
}

/* The first word that differs (PAGE_WORDS: none). */
static uint32_t check_page(uint32_t page, uint32_t gen)
{
    const uint32_t *w = page_at(page);
    if (w[0] != page) {
        return 0;
    }
    if (w[1] != gen) {
        return 1;
    }
    uint32_t v = page_seed(page, gen);
    for (uint32_t i = 2; i < PAGE_WORDS; i++) {
        if (w[i] != v) {
            return i;
        }
        v += WORD_STEP;
    }
    return PAGE_WORDS;
}

/* The rewrite schedule: rewrite k goes to page (k * stride) mod pages, a permutation, so
 * after cycle full rounds and cursor more rewrites page p has generation
 * cycle + (position of p in the round < cursor). */
struct schedule {
    uint32_t pages;
    uint32_t stride;
    uint32_t stride_inverse; /* stride * stride_inverse == 1 (mod pages) */
    uint32_t cycle;
    uint32_t cursor;   /* rewrites done in this cycle */
    uint32_t next;     /* the page rewrite number cursor goes to */
    uint32_t credit;   /* pages due * MEMCHECK_HZ, not yet rewritten */
    uint32_t last_tick;
    uint32_t rewritten_pages; /* since boot, modulo 2^32 */
};

static uint32_t gcd(uint32_t a, uint32_t b)
{
    while (b) {
        uint32_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* (a * b) mod m without 64-bit division: shift-and-add, m < 2^31. */
static uint32_t mulmod(uint32_t a, uint32_t b, uint32_t m)
{
    uint32_t result = 0;
    a %= m;
    while (b) {
        if (b & 1u) {
            result += a;
            if (result >= m) {
                result -= m;
            }
        }
        a += a;
        if (a >= m) {
            a -= m;
        }
        b >>= 1;
    }
    return result;
}

static uint32_t inverse_mod(uint32_t a, uint32_t m)
{
    /* extended Euclid on (a, m), coefficients kept modulo m */
    uint32_t r0 = m, r1 = a, t0 = 0, t1 = 1;
    while (r1) {
        uint32_t q = r0 / r1;
        uint32_t r2 = r0 - q * r1;
        uint32_t t2 = (t0 + m - mulmod(q, t1, m)) % m;
        r0 = r1;
        r1 = r2;
        t0 = t1;
        t1 = t2;
    }
    return t0 % m;
}

static void schedule_init(struct schedule *s, uint32_t pages)
{
    s->pages = pages;
    uint32_t stride = pages > 2 ? (uint32_t)((pages / 1000u) * 618u + (pages % 1000u) * 618u / 1000u) | 1u : 1u;
    if (stride >= pages) {
        stride = 1;
    }
    while (gcd(stride, pages) != 1) {
        stride += 2;
        if (stride >= pages) {
            stride = 1;
        }
    }
    s->stride = stride;
    s->stride_inverse = pages > 1 ? inverse_mod(stride, pages) : 0;
    s->cycle = 0;
    s->cursor = 0;
    s->next = 0;
    s->credit = 0;
    s->last_tick = now_ticks();
    s->rewritten_pages = 0;
}

/* Rewrite the pages that have come due since the last call (at most one full round). */
static void rewrite_due(struct schedule *s, uint32_t pages_per_s)
{
    uint32_t now = now_ticks();
    uint32_t elapsed = now - s->last_tick;
    s->last_tick = now;
    if (!pages_per_s) {
        return;
    }
    uint32_t cap = s->pages * MEMCHECK_HZ;
    if (elapsed > MEMCHECK_HZ) {
        elapsed = MEMCHECK_HZ; /* after a long stop, not a burst: one second's worth */
    }
    s->credit += pages_per_s * elapsed;
    if (s->credit > cap) {
        s->credit = cap;
    }
    uint32_t due = s->credit / MEMCHECK_HZ;
    s->credit -= due * MEMCHECK_HZ;
    while (due--) {
        if ((s->rewritten_pages % FLUSH_STRIDE) == 0) {
            flush_tlb();
        }
        write_page(s->next, s->cycle + 1u);
        s->rewritten_pages++;
        s->cursor++;
        s->next += s->stride;
        if (s->next >= s->pages) {
            s->next -= s->pages;
        }
        if (s->cursor == s->pages) {
            s->cursor = 0;
            s->cycle++;
            s->next = 0;
        }
    }
}

/* ---------------------------------------------------------------------------- account */

struct first_bad {
    uint32_t page;
    uint32_t want_gen;
    uint32_t found_page;
    uint32_t found_gen;
    uint32_t word;
    uint32_t want;
    uint32_t found;
    uint32_t at_ms;
    uint32_t pass;
};

static struct {
    struct options opt;
    struct schedule sched;
    uint32_t pages_per_s;
    uint32_t passes;
    uint32_t verified_mib;
    uint32_t pass_took_ms;
    uint32_t errors;
    struct first_bad first;
    uint32_t seq;
    uint32_t last_report_tick;
    uint32_t fill_ms;
    const char *phase;
} mc;

static void report(void)
{
    struct line l = {.len = 0};
    add_str(&l, "MEMCHECK");
    add_field(&l, "seq", mc.seq++);
    add_field(&l, "t_ms", now_ticks() * MS_PER_TICK);
    add_str(&l, " boot=");
    add_hex(&l, boot_salt);
    add_str(&l, " phase=");
    add_str(&l, mc.phase);
    add_field(&l, "ws_mib", mc.opt.mib);
    add_field(&l, "dirty_mib_s", mc.opt.dirty_mib_s);
    add_field(&l, "pass_ms", mc.opt.pass_ms);
    add_field(&l, "passes", mc.passes);
    add_field(&l, "verified_mib", mc.verified_mib);
    add_field(&l, "pass_took_ms", mc.pass_took_ms);
    add_field(&l, "rewritten_mib", mc.sched.rewritten_pages / PAGES_PER_MIB);
    add_field(&l, "errors", mc.errors);
    if (mc.errors) {
        const struct first_bad *f = &mc.first;
        add_field(&l, "bad_page", f->page);
        add_str(&l, " bad_addr=");
        add_hex(&l, MEMCHECK_BASE + f->page * PAGE_BYTES + f->word * 4u);
        add_field(&l, "want_gen", f->want_gen);
        add_field(&l, "found_page", f->found_page);
        add_field(&l, "found_gen", f->found_gen);
        add_field(&l, "bad_word", f->word);
        add_str(&l, " want=");
        add_hex(&l, f->want);
        add_str(&l, " found=");
        add_hex(&l, f->found);
        add_field(&l, "bad_at_ms", f->at_ms);
        add_field(&l, "bad_pass", f->pass);
    }
    send(&l, 1);
    mc.last_report_tick = now_ticks();
}

static void report_if_due(void)
{
    if ((now_ticks() - mc.last_report_tick) * MS_PER_TICK >= mc.opt.report_ms) {
        report();
    }
}

/* A bad page: count it, keep the first one's details, put the right content back (so a
 * page stays one error), and say so at once. */
static void page_error(uint32_t page, uint32_t gen, uint32_t word)
{
    const uint32_t *w = page_at(page);
    if (!mc.errors) {
        uint32_t want = word == 0 ? page : word == 1 ? gen : page_seed(page, gen) + (word - 2u) * WORD_STEP;
        mc.first = (struct first_bad){
            .page = page,
            .want_gen = gen,
            .found_page = w[0],
            .found_gen = w[1],
            .word = word,
            .want = want,
            .found = w[word],
            .at_ms = now_ticks() * MS_PER_TICK,
            .pass = mc.passes + 1u,
        };
    }
    mc.errors++;
    write_page(page, gen);
    report();
}

/* Between two pages of a long loop: a TLB flush every FLUSH_STRIDE pages, and at every new
 * tick what the clock says is due (rewrites, a report). A pass takes a tenth of a second
 * under TCG and tens of seconds where every instruction is emulated; the guest reports every
 * second either way. */
static void between_pages(uint32_t page, int rewrite)
{
    static uint32_t last_look;
    if ((page % FLUSH_STRIDE) == 0) {
        flush_tlb();
    }
    uint32_t now = now_ticks();
    if (now != last_look) {
        last_look = now;
        if (rewrite) {
            rewrite_due(&mc.sched, mc.pages_per_s);
        }
        report_if_due();
    }
}

static void verify_pass(void)
{
    struct schedule *s = &mc.sched;
    uint32_t position = 0; /* where page p comes in a round: p * stride_inverse mod pages */
    uint32_t started = now_ticks();
    for (uint32_t p = 0; p < s->pages; p++) {
        between_pages(p, 1);
        uint32_t gen = s->cycle + (position < s->cursor ? 1u : 0u);
        uint32_t word = check_page(p, gen);
        if (word != PAGE_WORDS) {
            page_error(p, gen, word);
        }
        position += s->stride_inverse;
        if (position >= s->pages) {
            position -= s->pages;
        }
    }
    mc.passes++;
    mc.verified_mib += mc.opt.mib;
    mc.pass_took_ms = (now_ticks() - started) * MS_PER_TICK;
}

/* ---------------------------------------------------------------------------- main */

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower;
    uint32_t mem_upper;
    uint32_t boot_device;
    uint32_t cmdline;
};

struct fault_frame {
    uint32_t vector;
    uint32_t error;
    uint32_t eip;
    uint32_t cs;
    uint32_t eflags;
};

void memcheck_fault(const struct fault_frame *f)
{
    struct line l = {.len = 0};
    add_str(&l, "MEMCHECK-FAULT");
    add_field(&l, "vector", f->vector);
    add_str(&l, " error=");
    add_hex(&l, f->error);
    add_str(&l, " eip=");
    add_hex(&l, f->eip);
    send(&l, 1);
    for (;;) {
        __asm__ volatile("cli; hlt");
    }
}

static uint32_t read_tsc_low(void)
{
    uint32_t low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return low ^ high;
}

static char cmdline_copy[512];

void memcheck_main(uint32_t magic, const struct multiboot_info *mbi)
{
    serial_init();
    boot_salt = mix(read_tsc_low()) | 1u;
    mc.phase = "boot";
    mc.opt = (struct options){
        .mib = 0, .dirty_mib_s = 0, .pass_ms = 1000, .report_ms = 1000, .tlb_flush = 1};

    uint32_t top_mib = 0;
    if (magic == 0x2BADB002u) {
        if (mbi->flags & 1u) {
            top_mib = (mbi->mem_upper + 1024u) / 1024u;
        }
        if ((mbi->flags & 4u) && mbi->cmdline) {
            const char *src = (const char *)mbi->cmdline;
            uint32_t i = 0;
            while (src[i] && i < sizeof cmdline_copy - 1) {
                cmdline_copy[i] = src[i];
                i++;
            }
            cmdline_copy[i] = 0;
        }
    }
    parse_options(cmdline_copy, &mc.opt);
    uint32_t room = top_mib > (MEMCHECK_BASE >> 20) + 1u ? top_mib - (MEMCHECK_BASE >> 20) - 1u : 0u;
    uint32_t asked = mc.opt.mib;
    if (!mc.opt.mib || mc.opt.mib > room) {
        mc.opt.mib = room;
    }
    if (mc.opt.pass_ms < MS_PER_TICK) {
        mc.opt.pass_ms = MS_PER_TICK;
    }
    if (mc.opt.report_ms < MS_PER_TICK || mc.opt.report_ms > 1000u) {
        mc.opt.report_ms = 1000u;
    }
    if (mc.opt.dirty_mib_s > 4096u) {
        mc.opt.dirty_mib_s = 4096u;
    }
    tlb_flush_on = mc.opt.tlb_flush && cpu_has_pge();

    struct line l = {.len = 0};
    add_str(&l, "MEMCHECK-BOOT");
    add_str(&l, " boot=");
    add_hex(&l, boot_salt);
    add_field(&l, "multiboot", magic == 0x2BADB002u);
    add_field(&l, "memory_mib", top_mib);
    add_field(&l, "asked_mib", asked);
    add_field(&l, "ws_mib", mc.opt.mib);
    add_field(&l, "dirty_mib_s", mc.opt.dirty_mib_s);
    add_field(&l, "pass_ms", mc.opt.pass_ms);
    add_field(&l, "report_ms", mc.opt.report_ms);
    add_field(&l, "tlb_flush", tlb_flush_on);
    add_field(&l, "unknown_options", mc.opt.unknown);
    send(&l, 0);

    interrupts_init();
    mc.pages_per_s = mc.opt.dirty_mib_s * PAGES_PER_MIB;
    schedule_init(&mc.sched, mc.opt.mib * PAGES_PER_MIB);
    mc.last_report_tick = now_ticks();

    mc.phase = "fill";
    for (uint32_t p = 0; p < mc.sched.pages; p++) {
        between_pages(p, 0);
        write_page(p, 0);
    }
    mc.fill_ms = now_ticks() * MS_PER_TICK;
    mc.phase = "run";
    mc.sched.last_tick = now_ticks();
    l.len = 0;
    add_str(&l, "MEMCHECK-READY");
    add_field(&l, "fill_ms", mc.fill_ms);
    add_field(&l, "ws_mib", mc.opt.mib);
    send(&l, 0);
    report();

    uint32_t pass_ticks = mc.opt.pass_ms / MS_PER_TICK;
    uint32_t last_pass = now_ticks();
    for (;;) {
        rewrite_due(&mc.sched, mc.pages_per_s);
        if (now_ticks() - last_pass >= pass_ticks) {
            last_pass = now_ticks();
            verify_pass();
        }
        report_if_due();
        wait_for_tick();
    }
}
