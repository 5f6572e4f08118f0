/* Greedy generation through egret's C ABI:
 *   generate ARTIFACT_DIR WEIGHTS MAX_NEW ID [ID ...]
 * prints the generated ids as a comma-separated line. */
#include <stdio.h>
#include <stdlib.h>

#include "egret_runtime.h"

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s ARTIFACT_DIR WEIGHTS MAX_NEW ID [ID ...]\n", argv[0]);
        return 2;
    }
    size_t max_new = (size_t)strtoul(argv[3], NULL, 10);
    size_t n = (size_t)(argc - 4);
    uint32_t *prompt = malloc(n * sizeof *prompt);
    uint32_t *out = malloc((max_new + 1) * sizeof *out);
    for (size_t i = 0; i < n; i++) prompt[i] = (uint32_t)strtoul(argv[4 + i], NULL, 10);
    egret_session *s = egret_session_open(argv[1], argv[2], 0);
    if (!s) {
        fprintf(stderr, "error: %s\n", egret_last_error());
        return 1;
    }
    int64_t got = egret_generate(s, prompt, n, max_new, 0.0f, 1.0f, 0, NULL, 0, out);
    if (got < 0) {
        fprintf(stderr, "error: %s\n", egret_last_error());
        egret_session_free(s);
        return 1;
    }
    for (int64_t i = 0; i < got; i++) printf(i ? ",%u" : "%u", out[i]);
    printf("\n");
    egret_session_free(s);
    free(prompt);
    free(out);
    return 0;
}
