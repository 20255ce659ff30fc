/* seqwriter: write numbered fixed-size records into a virtio-serial port, forever.
 *
 * Each record is exactly 32 bytes of text, "%020llu %010llu\n": a 64-bit counter and the
 * guest's CLOCK_MONOTONIC in ms (mod 10^10). The counter advances only after all 32 bytes
 * of a record were accepted by the port, so a loss-free transport shows the reader
 * 0, 1, 2, ... without a gap or a repeat, across a SPICE migration included.
 *
 * The port is opened O_NONBLOCK because nothing must wedge the writer while no SPICE
 * client has the port open: virtio_console then fails writes with EAGAIN, and poll()
 * reports POLLHUP at once instead of sleeping, so we back off a little ourselves.
 *
 * usage: seqwriter DEVICE [PERIOD_US]     (default period 1000 us: ~1000 records/s)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define RECORD_SIZE 32

static unsigned long long monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000ULL + (unsigned long long)ts.tv_nsec / 1000000ULL;
}

static void add_us(struct timespec *ts, long us)
{
    ts->tv_nsec += us * 1000L;
    while (ts->tv_nsec >= 1000000000L) {
        ts->tv_nsec -= 1000000000L;
        ts->tv_sec++;
    }
}

static int later_than(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec > b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec > b->tv_nsec);
}

/* Write one whole record. Returns 0 when done, -1 when the port must be reopened. */
static int write_record(int fd, const char *rec, unsigned long long *waits)
{
    size_t done = 0;
    while (done < RECORD_SIZE) {
        ssize_t n = write(fd, rec + done, RECORD_SIZE - done);
        if (n > 0) {
            done += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            (*waits)++;
            /* queue full: poll sleeps until there is room; host side closed: POLLHUP now */
            if (poll(&p, 1, 200) > 0 && (p.revents & POLLHUP))
                usleep(2000);
        } else {
            fprintf(stderr, "seqwriter: write: %s\n", n < 0 ? strerror(errno) : "short");
            return -1;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *device = argc > 1 ? argv[1] : "/dev/vport0p1";
    long period_us = argc > 2 ? atol(argv[2]) : 1000;
    unsigned long long seq = 0, waits = 0, reopens = 0;
    char rec[RECORD_SIZE + 1];
    struct timespec deadline, now;
    int fd = -1;

    if (period_us <= 0)
        period_us = 1000;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    for (;;) {
        if (fd < 0) {
            fd = open(device, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
            if (fd < 0) {
                reopens++;
                usleep(100000);
                continue;
            }
            fprintf(stderr, "seqwriter: writing to %s\n", device);
        }
        snprintf(rec, sizeof rec, "%020llu %010llu\n", seq, monotonic_ms() % 10000000000ULL);
        if (write_record(fd, rec, &waits) < 0) {
            /* e.g. ENODEV after an unplug: reopen and write the same record again */
            close(fd);
            fd = -1;
            reopens++;
            usleep(100000);
            continue;
        }
        if (seq % 10000 == 0)
            fprintf(stderr, "seqwriter: seq=%llu waits=%llu reopens=%llu\n", seq, waits, reopens);
        seq++;
        /* Pace on absolute deadlines; after a long stall restart the schedule from now
         * rather than bursting to catch up. */
        add_us(&deadline, period_us);
        clock_gettime(CLOCK_MONOTONIC, &now);
        struct timespec limit = deadline;
        limit.tv_sec += 1;
        if (later_than(&now, &limit))
            deadline = now;
        else
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL);
    }
}
