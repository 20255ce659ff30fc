/* dirtier: keep guest memory dirty so that a live migration needs several passes.
 *
 * It allocates MIB mebibytes, then forever writes one byte into every 4 KiB page and
 * sleeps PAUSE_MS milliseconds. Every pass re-dirties all the pages QEMU already sent.
 *
 * usage: dirtier MIB [PAUSE_MS]      (defaults: 64 MiB, 20 ms)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 64;
    long pause_ms = argc > 2 ? atol(argv[2]) : 20;
    size_t len = mib << 20;
    volatile unsigned char *buf = malloc(len);

    if (buf == NULL) {
        perror("dirtier: malloc");
        return 1;
    }
    memset((void *)buf, 1, len);
    fprintf(stderr, "dirtier: %zu MiB, %ld ms between passes\n", mib, pause_ms);
    for (unsigned long pass = 2;; pass++) {
        for (size_t off = 0; off < len; off += 4096)
            buf[off] = (unsigned char)pass;
        if (pause_ms > 0)
            usleep((useconds_t)pause_ms * 1000);
    }
}
