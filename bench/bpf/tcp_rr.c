// SPDX-License-Identifier: GPL-3.0-or-later
// Request/response latency for bench/datapath.py (not BPF: a host program built beside the
// benchmark's BPF fixture). A TCP_RR loop in the manner of netperf: one connection, 1-byte request,
// 1-byte response, the next request only after the response. No statistics here: the client prints
// every transaction's latency and bench/datapath.py computes median/p99/tps with bench/benchlib.py.
//
//   tcp_rr server PORT                      prints "ready" once listening; serves clients one by one
//   tcp_rr client ADDR PORT SECONDS WARMUP  WARMUP transactions first (not recorded), then SECONDS
//                                           of transactions; prints "tcp_rr 1 <count> <elapsed_ns>"
//                                           and then one latency in ns per line
//
// Build: clang -O2 -o tcp_rr tcp_rr.c (clang, from requirements/apt.txt, brings libc6-dev)
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int fail(const char *what)
{
	fprintf(stderr, "tcp_rr: %s: %s\n", what, strerror(errno));
	return 1;
}

static int nodelay(int fd)
{
	int one = 1;
	return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int serve(int port)
{
	int one = 1;
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0)
		return fail("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return fail("bind");
	if (listen(lfd, 8) < 0)
		return fail("listen");
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		char byte;
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			return fail("accept");
		}
		nodelay(fd);
		while (read(fd, &byte, 1) == 1)
			if (write(fd, &byte, 1) != 1)
				break;
		close(fd);
	}
}

static int transact(int fd)
{
	char byte = 'x';
	if (write(fd, &byte, 1) != 1)
		return -1;
	return read(fd, &byte, 1) == 1 ? 0 : -1;
}

static int client(const char *host, int port, double seconds, long warmup)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
	size_t cap = 1 << 16, n = 0;
	uint64_t *lat = malloc(cap * sizeof(*lat));
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (!lat || fd < 0)
		return fail("socket");
	if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
		fprintf(stderr, "tcp_rr: %s is not an IPv4 address\n", host);
		return 1;
	}
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return fail("connect");
	nodelay(fd);
	for (long i = 0; i < warmup; i++)
		if (transact(fd) < 0)
			return fail("warm-up transaction");
	uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9), t0 = start, t1;
	do {
		if (transact(fd) < 0)
			return fail("transaction");
		t1 = now_ns();
		if (n == cap) {
			cap *= 2;
			lat = realloc(lat, cap * sizeof(*lat));
			if (!lat)
				return fail("realloc");
		}
		lat[n++] = t1 - t0;
		t0 = t1;
	} while (t1 < end);
	close(fd);
	printf("tcp_rr 1 %zu %llu\n", n, (unsigned long long)(t1 - start));
	for (size_t i = 0; i < n; i++)
		printf("%llu\n", (unsigned long long)lat[i]);
	return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "server") == 0)
		return serve(atoi(argv[2]));
	if (argc == 6 && strcmp(argv[1], "client") == 0)
		return client(argv[2], atoi(argv[3]), atof(argv[4]), atol(argv[5]));
	fprintf(stderr, "usage: tcp_rr server PORT | tcp_rr client ADDR PORT SECONDS WARMUP\n");
	return 2;
}
