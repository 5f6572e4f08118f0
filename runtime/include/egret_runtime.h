/* egret_runtime.h: the C interface of egret's runtime (libegret_runtime.so, built by
 * `cargo rustc -p egret-runtime --release --lib --crate-type cdylib`).
 *
 * Load an artifact compiled by `egret compile`, bind its weights (a .gguf file, a
 * .safetensors file or a Hugging Face directory), and run it. Functions that can fail return
 * NULL or -1; egret_last_error() then gives the reason (per thread, valid until the next
 * call on that thread). Sessions are not thread-safe: use one per thread.
 */
#ifndef EGRET_RUNTIME_H
#define EGRET_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct egret_session egret_session;

/* Opens an artifact directory with weights; threads 0 = all cores. NULL on failure. */
egret_session *egret_session_open(const char *artifact_dir, const char *weights_path,
                                  size_t threads);
/* Frees a session (NULL is ignored). */
void egret_session_free(egret_session *s);
/* Length of every logits row. */
size_t egret_vocab_size(const egret_session *s);
/* Empties the KV cache, runs ids[0..n) and writes the logits after the last (vocab floats). */
int egret_prefill(egret_session *s, const uint32_t *ids, size_t n, float *logits_out);
/* Appends one token to the KV cache and writes the logits after it. */
int egret_decode(egret_session *s, uint32_t id, float *logits_out);
/* Generates up to max_new ids after the prompt into out (temperature 0: greedy), stopping
 * after any of stop_ids. Returns the number generated, or -1. */
int64_t egret_generate(egret_session *s, const uint32_t *prompt, size_t n_prompt,
                       size_t max_new, float temperature, float top_p, uint64_t seed,
                       const uint32_t *stop_ids, size_t n_stop, uint32_t *out);
/* Why the last failing call on this thread failed. */
const char *egret_last_error(void);

#ifdef __cplusplus
}
#endif

#endif
