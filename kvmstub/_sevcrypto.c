/* The simulated SEV hardware's per-page crypto, in native code.
 *
 * On a real host none of this runs on the host's cores: the memory controller encrypts guest
 * memory (AES with a physical-address tweak) and the PSP seals and opens transport packets.
 * kvmstub models both in software; done through Python, one page's crypto cost several
 * times what the VMMs and the daemon's checks around it cost, so a migration measured the
 * model's crypto, not the code under test.
 *
 * Two keyed objects, each holding only OpenSSL contexts (the key schedules; OpenSSL
 * cleanses a context when it is freed), never a copy of the raw key:
 *
 *   XtsKey(vek)            AES-256-XTS under one 64-byte VEK; encrypt/decrypt(tweak, data)
 *                          re-key nothing: each call only sets the tweak (the IV).
 *   PacketKeys(tek, tik)   SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA's transport crypto:
 *                          AES-128-CTR under the TEK, HMAC-SHA256 under the TIK over
 *                          context 0x02, flags, IV, both lengths and the ciphertext
 *                          (encrypt-then-MAC). seal(iv, plaintext) -> (header, ciphertext);
 *                          open(flags, iv, mac, ciphertext) -> plaintext, or None when the
 *                          MAC does not verify.
 *
 * kvmstub.sev_crypto and kvmstub.memory keep the reference implementation in Python (through
 * `cryptography` and `hashlib`); tests/kvmstub/test_sevcrypto_native.py holds the two to the
 * same bytes. Single-threaded use per object, as the daemon's one thread does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#define KEY_LEN 16
#define VEK_LEN 64
#define MAC_LEN 32
#define HEADER_LEN (4 + KEY_LEN + MAC_LEN)
#define SHA256_BLOCK 64
#define CTX_DATA 0x02

/* A failed OpenSSL call: its error queue (this thread's, shared with Python's ssl and hashlib,
 * which link the same libcrypto) is emptied, and the failure raised as ValueError. */
static PyObject *
openssl_error(const char *what)
{
    ERR_clear_error();
    PyErr_Format(PyExc_ValueError, "kvmstub native crypto: %s failed", what);
    return NULL;
}

/* A read-only buffer argument of exactly `len` bytes (len < 0: any length). */
static int
get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t len, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (len >= 0 && view->len != len) {
        PyErr_Format(PyExc_ValueError, "%s is %zd bytes, not %zd", name, len, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    if (view->len > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s is too large", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* --- XtsKey ----------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
} XtsKey;

static void
XtsKey_dealloc(XtsKey *self)
{
    EVP_CIPHER_CTX_free(self->enc); /* cleanses the key schedule */
    EVP_CIPHER_CTX_free(self->dec);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
XtsKey_init(XtsKey *self, PyObject *args, PyObject *kwds)
{
    static const unsigned char zero_iv[16];
    PyObject *key_obj;
    Py_buffer key;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "XtsKey takes one positional argument, the VEK");
        return -1;
    }
    if (!PyArg_UnpackTuple(args, "XtsKey", 1, 1, &key_obj))
        return -1;
    if (self->enc != NULL) {
        PyErr_SetString(PyExc_TypeError, "XtsKey is keyed once");
        return -1;
    }
    if (get_buffer(key_obj, &key, VEK_LEN, "a VEK") < 0)
        return -1;
    self->enc = EVP_CIPHER_CTX_new();
    self->dec = EVP_CIPHER_CTX_new();
    if (self->enc == NULL || self->dec == NULL) {
        PyBuffer_Release(&key);
        PyErr_NoMemory();
        return -1;
    }
    int ok = EVP_CipherInit_ex(self->enc, EVP_aes_256_xts(), NULL, key.buf, zero_iv, 1) == 1
             && EVP_CipherInit_ex(self->dec, EVP_aes_256_xts(), NULL, key.buf, zero_iv, 0) == 1;
    PyBuffer_Release(&key);
    if (!ok) {
        /* OpenSSL's XTS key check (what `cryptography` reports as "duplicated keys"). */
        ERR_clear_error();
        PyErr_SetString(PyExc_ValueError,
                        "a VEK's two halves must differ (AES-256-XTS: duplicated keys)");
        return -1;
    }
    return 0;
}

static PyObject *
xts_run(EVP_CIPHER_CTX *ctx, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer tweak, data;
    if (ctx == NULL) {
        PyErr_SetString(PyExc_ValueError, "XtsKey is not keyed");
        return NULL;
    }
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "takes the tweak (16 bytes) and the data");
        return NULL;
    }
    if (get_buffer(args[0], &tweak, 16, "an XTS tweak") < 0)
        return NULL;
    if (get_buffer(args[1], &data, -1, "the data") < 0) {
        PyBuffer_Release(&tweak);
        return NULL;
    }
    PyObject *out = NULL;
    if (data.len < 16) {
        PyErr_SetString(PyExc_ValueError, "XTS takes at least one 16-byte block");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, data.len);
    if (out == NULL)
        goto done;
    int n = 0;
    if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, tweak.buf, -1) != 1
        || EVP_CipherUpdate(ctx, (unsigned char *)PyBytes_AS_STRING(out), &n, data.buf,
                            (int)data.len) != 1
        || n != data.len) {
        Py_CLEAR(out);
        openssl_error("AES-256-XTS");
    }
done:
    PyBuffer_Release(&tweak);
    PyBuffer_Release(&data);
    return out;
}

static PyObject *
XtsKey_encrypt(XtsKey *self, PyObject *const *args, Py_ssize_t nargs)
{
    return xts_run(self->enc, args, nargs);
}

static PyObject *
XtsKey_decrypt(XtsKey *self, PyObject *const *args, Py_ssize_t nargs)
{
    return xts_run(self->dec, args, nargs);
}

static PyMethodDef XtsKey_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))XtsKey_encrypt, METH_FASTCALL,
     "encrypt(tweak, data) -> bytes: `data` as one XTS data unit under `tweak`."},
    {"decrypt", (PyCFunction)(void (*)(void))XtsKey_decrypt, METH_FASTCALL,
     "decrypt(tweak, data) -> bytes: the inverse of encrypt."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject XtsKeyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmstub._sevcrypto.XtsKey",
    .tp_doc = PyDoc_STR("XtsKey(vek): AES-256-XTS under one 64-byte VEK."),
    .tp_basicsize = sizeof(XtsKey),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)XtsKey_init,
    .tp_dealloc = (destructor)XtsKey_dealloc,
    .tp_methods = XtsKey_methods,
};

/* --- PacketKeys ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctr;  /* AES-128-CTR under the TEK */
    EVP_MD_CTX *inner;    /* SHA-256 after HMAC's inner keyed block (TIK ^ ipad) */
    EVP_MD_CTX *outer;    /* SHA-256 after HMAC's outer keyed block (TIK ^ opad) */
    EVP_MD_CTX *scratch;
} PacketKeys;

static void
PacketKeys_dealloc(PacketKeys *self)
{
    EVP_CIPHER_CTX_free(self->ctr);
    EVP_MD_CTX_free(self->inner);
    EVP_MD_CTX_free(self->outer);
    EVP_MD_CTX_free(self->scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
PacketKeys_init(PacketKeys *self, PyObject *args, PyObject *kwds)
{
    static const unsigned char zero_iv[16];
    PyObject *tek_obj, *tik_obj;
    Py_buffer tek, tik;
    unsigned char pad[SHA256_BLOCK];
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "PacketKeys takes two positional arguments");
        return -1;
    }
    if (!PyArg_UnpackTuple(args, "PacketKeys", 2, 2, &tek_obj, &tik_obj))
        return -1;
    if (self->ctr != NULL) {
        PyErr_SetString(PyExc_TypeError, "PacketKeys is keyed once");
        return -1;
    }
    if (get_buffer(tek_obj, &tek, KEY_LEN, "a TEK") < 0)
        return -1;
    if (get_buffer(tik_obj, &tik, KEY_LEN, "a TIK") < 0) {
        PyBuffer_Release(&tek);
        return -1;
    }
    self->ctr = EVP_CIPHER_CTX_new();
    self->inner = EVP_MD_CTX_new();
    self->outer = EVP_MD_CTX_new();
    self->scratch = EVP_MD_CTX_new();
    int ok = self->ctr != NULL && self->inner != NULL && self->outer != NULL
             && self->scratch != NULL
             && EVP_EncryptInit_ex(self->ctr, EVP_aes_128_ctr(), NULL, tek.buf, zero_iv) == 1;
    if (ok) { /* RFC 2104 with a key shorter than a block: the key, zero-padded, ^ ipad / opad */
        memset(pad, 0, sizeof pad);
        memcpy(pad, tik.buf, KEY_LEN);
        for (int i = 0; i < SHA256_BLOCK; i++)
            pad[i] ^= 0x36;
        ok = EVP_DigestInit_ex(self->inner, EVP_sha256(), NULL) == 1
             && EVP_DigestUpdate(self->inner, pad, sizeof pad) == 1;
        for (int i = 0; i < SHA256_BLOCK; i++)
            pad[i] ^= 0x36 ^ 0x5c;
        ok = ok && EVP_DigestInit_ex(self->outer, EVP_sha256(), NULL) == 1
             && EVP_DigestUpdate(self->outer, pad, sizeof pad) == 1;
        OPENSSL_cleanse(pad, sizeof pad);
    }
    PyBuffer_Release(&tek);
    PyBuffer_Release(&tik);
    if (!ok) {
        openssl_error("keying AES-128-CTR and HMAC-SHA256");
        return -1;
    }
    return 0;
}

/* HMAC-SHA256 of context 0x02, flags, IV, both lengths and the ciphertext, into `mac`. */
static int
packet_mac(PacketKeys *self, uint32_t flags, const unsigned char *iv, uint32_t plain_len,
           const unsigned char *ct, int ct_len, unsigned char *mac)
{
    unsigned char head[1 + 4 + KEY_LEN + 8], digest[MAC_LEN];
    unsigned int n = 0;
    head[0] = CTX_DATA;
    for (int i = 0; i < 4; i++) {
        head[1 + i] = (unsigned char)(flags >> (8 * i));
        head[1 + 4 + KEY_LEN + i] = (unsigned char)(plain_len >> (8 * i));
        head[1 + 4 + KEY_LEN + 4 + i] = (unsigned char)((uint32_t)ct_len >> (8 * i));
    }
    memcpy(head + 5, iv, KEY_LEN);
    return EVP_MD_CTX_copy_ex(self->scratch, self->inner) == 1
           && EVP_DigestUpdate(self->scratch, head, sizeof head) == 1
           && EVP_DigestUpdate(self->scratch, ct, (size_t)ct_len) == 1
           && EVP_DigestFinal_ex(self->scratch, digest, &n) == 1 && n == MAC_LEN
           && EVP_MD_CTX_copy_ex(self->scratch, self->outer) == 1
           && EVP_DigestUpdate(self->scratch, digest, MAC_LEN) == 1
           && EVP_DigestFinal_ex(self->scratch, mac, &n) == 1 && n == MAC_LEN;
}

static int
ctr_run(PacketKeys *self, const unsigned char *iv, const unsigned char *in, int len,
        unsigned char *out)
{
    int n = 0;
    return EVP_EncryptInit_ex(self->ctr, NULL, NULL, NULL, iv) == 1
           && EVP_EncryptUpdate(self->ctr, out, &n, in, len) == 1 && n == len;
}

static PyObject *
PacketKeys_seal(PacketKeys *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer iv, plain;
    if (self->ctr == NULL)
        return openssl_error("an unkeyed PacketKeys");
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "seal takes the IV (16 bytes) and the plaintext");
        return NULL;
    }
    if (get_buffer(args[0], &iv, KEY_LEN, "an IV") < 0)
        return NULL;
    if (get_buffer(args[1], &plain, -1, "the plaintext") < 0) {
        PyBuffer_Release(&iv);
        return NULL;
    }
    PyObject *result = NULL;
    PyObject *header = PyBytes_FromStringAndSize(NULL, HEADER_LEN);
    PyObject *ct = PyBytes_FromStringAndSize(NULL, plain.len);
    if (header == NULL || ct == NULL)
        goto done;
    unsigned char *h = (unsigned char *)PyBytes_AS_STRING(header);
    unsigned char *c = (unsigned char *)PyBytes_AS_STRING(ct);
    memset(h, 0, 4); /* flags: never compressed */
    memcpy(h + 4, iv.buf, KEY_LEN);
    if (!ctr_run(self, iv.buf, plain.buf, (int)plain.len, c)
        || !packet_mac(self, 0, iv.buf, (uint32_t)plain.len, c, (int)plain.len,
                       h + 4 + KEY_LEN)) {
        openssl_error("sealing a packet");
        goto done;
    }
    result = PyTuple_Pack(2, header, ct);
done:
    Py_XDECREF(header);
    Py_XDECREF(ct);
    PyBuffer_Release(&iv);
    PyBuffer_Release(&plain);
    return result;
}

static PyObject *
PacketKeys_open(PacketKeys *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer iv, mac, ct;
    unsigned char expect[MAC_LEN];
    if (self->ctr == NULL)
        return openssl_error("an unkeyed PacketKeys");
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "open takes flags, IV, MAC and ciphertext");
        return NULL;
    }
    unsigned long flags = PyLong_AsUnsignedLong(args[0]);
    if (flags == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (flags > 0xffffffffUL) {
        PyErr_SetString(PyExc_OverflowError, "packet flags are 32 bits");
        return NULL;
    }
    if (get_buffer(args[1], &iv, KEY_LEN, "an IV") < 0)
        return NULL;
    if (get_buffer(args[2], &mac, MAC_LEN, "a MAC") < 0) {
        PyBuffer_Release(&iv);
        return NULL;
    }
    if (get_buffer(args[3], &ct, -1, "the ciphertext") < 0) {
        PyBuffer_Release(&iv);
        PyBuffer_Release(&mac);
        return NULL;
    }
    PyObject *out = NULL;
    if (!packet_mac(self, (uint32_t)flags, iv.buf, (uint32_t)ct.len, ct.buf, (int)ct.len,
                    expect)) {
        openssl_error("a packet's MAC");
        goto done;
    }
    if (CRYPTO_memcmp(expect, mac.buf, MAC_LEN) != 0) {
        out = Py_NewRef(Py_None); /* the caller's BadMac */
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, ct.len);
    if (out == NULL)
        goto done;
    if (!ctr_run(self, iv.buf, ct.buf, (int)ct.len, (unsigned char *)PyBytes_AS_STRING(out))) {
        Py_CLEAR(out);
        openssl_error("opening a packet");
    }
done:
    OPENSSL_cleanse(expect, sizeof expect);
    PyBuffer_Release(&iv);
    PyBuffer_Release(&mac);
    PyBuffer_Release(&ct);
    return out;
}

static PyMethodDef PacketKeys_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))PacketKeys_seal, METH_FASTCALL,
     "seal(iv, plaintext) -> (header, ciphertext): flags 0, encrypt-then-MAC."},
    {"open", (PyCFunction)(void (*)(void))PacketKeys_open, METH_FASTCALL,
     "open(flags, iv, mac, ciphertext) -> plaintext, or None if the MAC does not verify."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PacketKeysType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmstub._sevcrypto.PacketKeys",
    .tp_doc = PyDoc_STR("PacketKeys(tek, tik): a transport channel's packet crypto."),
    .tp_basicsize = sizeof(PacketKeys),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)PacketKeys_init,
    .tp_dealloc = (destructor)PacketKeys_dealloc,
    .tp_methods = PacketKeys_methods,
};

/* --- the module ------------------------------------------------------------------------- */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvmstub._sevcrypto",
    .m_doc = PyDoc_STR("The simulated SEV hardware's per-page crypto (AES-256-XTS of guest "
                       "memory; the transport packets' AES-128-CTR and HMAC-SHA256)."),
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__sevcrypto(void)
{
    if (PyType_Ready(&XtsKeyType) < 0 || PyType_Ready(&PacketKeysType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "XtsKey", (PyObject *)&XtsKeyType) < 0
        || PyModule_AddObjectRef(m, "PacketKeys", (PyObject *)&PacketKeysType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
