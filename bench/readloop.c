/* open+read+close (or stat) of one file in a loop, on N threads; prints ns per op. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *path; static long iters; static int stat_only;
static void *loop(void *arg) {
    char buf[4096]; struct stat st;
    for (long i = 0; i < iters; i++) {
        if (stat_only) { if (stat(path, &st) != 0) { perror("stat"); exit(1); } continue; }
        int fd = open(path, O_RDONLY);
        if (fd < 0) { perror("open"); exit(1); }
        if (read(fd, buf, sizeof buf) <= 0) { perror("read"); exit(1); }
        close(fd);
    }
    return arg;
}
int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: readloop PATH ITERS THREADS read|stat\n"); return 2; }
    path = argv[1]; iters = atol(argv[2]); int threads = atoi(argv[3]); stat_only = !strcmp(argv[4], "stat");
    pthread_t t[64]; struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, loop, NULL);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / (iters * threads));
    return 0;
}
