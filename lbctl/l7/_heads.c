/* The L7 proxy's fast path for the two heads every simple request has, in C: a GET's head as
 * it comes from the client, turned into the head the backend gets (the header rules of
 * proxy.forward_head), and an answer's head with a Content-Length, turned into the head the
 * client gets (the rules of proxy._FastExchange). One call each instead of one Python
 * callback per header line.
 *
 * These functions accept a strict subset of HTTP/1.1 and return None for everything else:
 * the caller then hands the same bytes to httptools (llhttp), which stays the parser of
 * record for every request and answer these do not take, and which answers malformed input.
 * What they accept, httptools parses the same way: tests/unit/test_l7_heads.py checks the
 * output of both paths byte for byte over generated and mutated heads. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_FIELDS 128

/* RFC 9110 token characters (a header's name), and the characters of a field value as
 * llhttp takes them (HTAB, SP, visible ASCII, obs-text): set up when the module loads. */
static unsigned char is_tchar[256];
static unsigned char is_vchar[256];
/* Visible ASCII: what the fast path takes in a request target. */
static unsigned char is_urlchar[256];

typedef struct {
    const char *name;
    Py_ssize_t name_len;
    const char *value;
    Py_ssize_t value_len;
    int kind;           /* enum kind, set by parse_fields */
} field;

/* Header names the rules treat apart from the rest. */
enum kind {
    K_OTHER,
    K_HOP,           /* hop-by-hop: never crosses the proxy */
    K_CONNECTION,
    K_CONTENT_LENGTH,
    K_TRANSFER_ENCODING,
    K_EXPECT,
    K_HOST,
    K_XFF,
    K_XFP,
};

static int same_lower(const char *s, Py_ssize_t len, const char *lower, Py_ssize_t lower_len)
{
    if (len != lower_len)
        return 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c + 32);
        if (c != (unsigned char)lower[i])
            return 0;
    }
    return 1;
}

/* The names the rules treat apart, lower-case: looked up by length first, so most header
 * names are passed over with one comparison each. */
#define NAME(lit, k) {lit, (Py_ssize_t)sizeof(lit) - 1, k}
static const struct {
    const char *name;
    Py_ssize_t len;
    enum kind kind;
} special[] = {
    NAME("te", K_HOP), NAME("host", K_HOST), NAME("expect", K_EXPECT), NAME("trailer", K_HOP),
    NAME("upgrade", K_HOP), NAME("connection", K_CONNECTION), NAME("keep-alive", K_HOP),
    NAME("content-length", K_CONTENT_LENGTH), NAME("x-forwarded-for", K_XFF),
    NAME("proxy-connection", K_HOP), NAME("transfer-encoding", K_TRANSFER_ENCODING),
    NAME("x-forwarded-proto", K_XFP), NAME("proxy-authenticate", K_HOP),
    NAME("proxy-authorization", K_HOP),
};

static enum kind kind_of(const char *name, Py_ssize_t len)
{
    for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); i++)
        if (special[i].len == len && same_lower(name, len, special[i].name, len))
            return special[i].kind;
    return K_OTHER;
}

/* A Connection value the fast path takes: exactly "close" (1) or "keep-alive" (0); -1 for
 * anything else (a list, other tokens: the headers it names must go too, which httptools'
 * path does). */
static int connection_close(const field *f)
{
    if (same_lower(f->value, f->value_len, "close", 5))
        return 1;
    if (same_lower(f->value, f->value_len, "keep-alive", 10))
        return 0;
    return -1;
}

/* The header lines from p (just past the start line) to the blank line: the position past
 * the head's last CRLF, or NULL for a head the fast path does not take (incomplete, more
 * than max fields, obs-fold, a space before the colon, a bare LF, a control character, a
 * Connection header other than one plain close or keep-alive). `close`: Connection: close. */
static const char *parse_fields(const char *p, const char *end, field *f, int max, int *count,
                                int *close)
{
    int n = 0, connections = 0;
    *close = 0;
    for (;;) {
        if (end - p < 2)
            return NULL;
        if (p[0] == '\r')
            return p[1] == '\n' ? (*count = n, p + 2) : NULL;
        if (n == max)
            return NULL;
        const char *name = p;
        while (p < end && is_tchar[(unsigned char)*p])
            p++;
        if (p == name || p >= end || *p != ':')
            return NULL;
        f[n].name = name;
        f[n].name_len = p - name;
        f[n].kind = kind_of(name, p - name);
        p++;
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        const char *value = p;
        while (p < end && is_vchar[(unsigned char)*p])
            p++;
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
            return NULL;
        f[n].value = value;
        f[n].value_len = p - value;
        if (f[n].kind == K_CONNECTION) {
            *close = connection_close(&f[n]);
            if (*close < 0 || ++connections > 1)
                return NULL;
        }
        n++;
        p += 2;
    }
}

/* A growing output buffer: a bytes object resized at the end. */
typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
    PyObject *obj;
} out_t;

static int out_init(out_t *o, Py_ssize_t cap)
{
    o->obj = PyBytes_FromStringAndSize(NULL, cap);
    if (o->obj == NULL)
        return -1;
    o->buf = PyBytes_AS_STRING(o->obj);
    o->len = 0;
    o->cap = cap;
    return 0;
}

static void out_put(out_t *o, const char *s, Py_ssize_t n)
{
    /* The caller sized the buffer for the worst case: this cannot overflow. */
    memcpy(o->buf + o->len, s, (size_t)n);
    o->len += n;
}

#define PUT_LIT(o, lit) out_put(o, lit, (Py_ssize_t)sizeof(lit) - 1)

static PyObject *out_done(out_t *o)
{
    if (_PyBytes_Resize(&o->obj, o->len) < 0)
        return NULL;
    return o->obj;
}

static int bytes_arg(PyObject *arg, const char *what)
{
    if (!PyBytes_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", what);
        return 0;
    }
    return 1;
}

/* request(data, client, tail, pool_enabled, max_headers, max_head_bytes)
 *   -> (upstream_head, host or None, keep_alive, url) or None
 * `data` is everything a read brought: taken only when it is exactly one complete GET head
 * (HTTP/1.1, origin-form target, no body, no Expect, no Connection naming other headers,
 * at most one Host), within the limits. The head built is forward_head's: hop-by-hop
 * headers out, X-Forwarded-For appended to, X-Forwarded-Proto and Forwarded set (`tail`, from
 * forwarded_tail), Host kept, and Connection: close to the backend when pools are off. */
static PyObject *heads_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "request() takes 6 arguments");
        return NULL;
    }
    if (!bytes_arg(args[0], "data") || !bytes_arg(args[1], "client") || !bytes_arg(args[2], "tail"))
        return NULL;
    int pool_enabled = PyObject_IsTrue(args[3]);
    long max_headers = PyLong_AsLong(args[4]);
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[5]);
    if (pool_enabled < 0 || (max_headers == -1 && PyErr_Occurred()) ||
        (max_bytes == -1 && PyErr_Occurred()))
        return NULL;
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    if (size > max_bytes || size < 18 || memcmp(data, "GET /", 5) != 0)
        Py_RETURN_NONE;
    const char *end = data + size;
    const char *url = data + 4;
    const char *p = url;
    while (p < end && is_urlchar[(unsigned char)*p])
        p++;
    Py_ssize_t url_len = p - url;
    if (end - p < 11 || memcmp(p, " HTTP/1.1\r\n", 11) != 0)
        Py_RETURN_NONE;
    p += 11;
    field f[MAX_FIELDS];
    int n = 0;
    int max = max_headers < MAX_FIELDS ? (int)max_headers : MAX_FIELDS;
    int close;
    const char *after = parse_fields(p, end, f, max < 0 ? 0 : max, &n, &close);
    if (after != end)
        Py_RETURN_NONE;        /* incomplete, not ours, or more bytes after the head */

    int host = -1;
    Py_ssize_t xff_len = 0, xff_n = 0;
    for (int i = 0; i < n; i++) {
        switch (f[i].kind) {
        case K_HOST:
            if (host >= 0)
                Py_RETURN_NONE;
            host = i;
            break;
        case K_XFF:
            xff_len += f[i].value_len + 2;
            xff_n++;
            break;
        case K_CONTENT_LENGTH:
        case K_TRANSFER_ENCODING:
        case K_EXPECT:
            Py_RETURN_NONE;
        default:
            break;
        }
    }
    const char *client = PyBytes_AS_STRING(args[1]);
    Py_ssize_t client_len = PyBytes_GET_SIZE(args[1]);
    const char *tail = PyBytes_AS_STRING(args[2]);
    Py_ssize_t tail_len = PyBytes_GET_SIZE(args[2]);
    /* An upper bound: each kept line grows by at most one byte (": "), the X-Forwarded-For
     * values move to one line, and what is added is the client, the tail, the host again
     * and fixed text. */
    Py_ssize_t out_len = size + n + client_len + tail_len + 64;
    if (host >= 0)
        out_len += f[host].value_len;

    out_t o;
    if (out_init(&o, out_len) < 0)
        return NULL;
    PUT_LIT(&o, "GET ");
    out_put(&o, url, url_len);
    PUT_LIT(&o, " HTTP/1.1\r\n");
    for (int i = 0; i < n; i++) {
        enum kind k = f[i].kind;
        if (k != K_OTHER && k != K_HOST)
            continue;
        out_put(&o, f[i].name, f[i].name_len);
        PUT_LIT(&o, ": ");
        out_put(&o, f[i].value, f[i].value_len);
        PUT_LIT(&o, "\r\n");
    }
    PUT_LIT(&o, "X-Forwarded-For: ");
    /* As forward_head: the client's own X-Forwarded-For values joined, kept if not empty. */
    if (xff_len - 2 * (xff_n > 0) > 0) {
        Py_ssize_t seen = 0;
        for (int i = 0; i < n; i++) {
            if (f[i].kind != K_XFF)
                continue;
            if (seen++)
                PUT_LIT(&o, ", ");
            out_put(&o, f[i].value, f[i].value_len);
        }
        PUT_LIT(&o, ", ");
    }
    out_put(&o, client, client_len);
    PUT_LIT(&o, "\r\n");
    out_put(&o, tail, tail_len);
    if (host >= 0 && f[host].value_len) {
        PUT_LIT(&o, ";host=");
        out_put(&o, f[host].value, f[host].value_len);
    }
    if (!pool_enabled)
        PUT_LIT(&o, "\r\nConnection: close");
    PUT_LIT(&o, "\r\n\r\n");
    PyObject *head = out_done(&o);
    if (head == NULL)
        return NULL;
    PyObject *host_obj;
    if (host >= 0) {
        host_obj = PyBytes_FromStringAndSize(f[host].value, f[host].value_len);
    } else {
        host_obj = Py_None;
        Py_INCREF(host_obj);
    }
    PyObject *url_obj = PyBytes_FromStringAndSize(url, url_len);
    if (host_obj == NULL || url_obj == NULL) {
        Py_DECREF(head);
        Py_XDECREF(host_obj);
        Py_XDECREF(url_obj);
        return NULL;
    }
    return Py_BuildValue("(NNON)", head, host_obj, close ? Py_False : Py_True, url_obj);
}

/* response(data, client_keep) -> (status, out, left, upstream_keep, extra) or None
 * Takes an HTTP/1.1 answer whose whole head is in `data`, with a status from 200 to 599 but
 * 204 and 304, exactly one Content-Length of digits, no Transfer-Encoding, and a Connection
 * header that is absent or exactly close or keep-alive. `out` is what the client gets of
 * this read: _FastExchange's head (the status line with the code, hop-by-hop headers out,
 * Connection: close when the client's connection ends after this answer) and the body bytes
 * the read holds, at most Content-Length of them; `left` is how many body bytes are still
 * to come, and `extra` says the read held bytes past the answer (the backend sent what
 * nobody asked for: its connection is not reused). */
static PyObject *heads_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "response() takes 2 arguments");
        return NULL;
    }
    if (!bytes_arg(args[0], "data"))
        return NULL;
    int client_keep = PyObject_IsTrue(args[1]);
    if (client_keep < 0)
        return NULL;
    const char *data = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    const char *end = data + size;
    if (size < 17 || memcmp(data, "HTTP/1.1 ", 9) != 0)
        Py_RETURN_NONE;
    const char *d = data + 9;
    if (d[0] < '2' || d[0] > '5' || d[1] < '0' || d[1] > '9' || d[2] < '0' || d[2] > '9' ||
        d[3] != ' ')
        Py_RETURN_NONE;
    int status = (d[0] - '0') * 100 + (d[1] - '0') * 10 + (d[2] - '0');
    if (status == 204 || status == 304)
        Py_RETURN_NONE;
    const char *p = d + 4;
    while (p < end && is_vchar[(unsigned char)*p])
        p++;
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
        Py_RETURN_NONE;
    p += 2;
    field f[MAX_FIELDS];
    int n = 0;
    int close;
    const char *after = parse_fields(p, end, f, MAX_FIELDS, &n, &close);
    if (after == NULL)
        Py_RETURN_NONE;

    long long length = -1;
    for (int i = 0; i < n; i++) {
        switch (f[i].kind) {
        case K_CONTENT_LENGTH:
            if (length >= 0 || f[i].value_len == 0 || f[i].value_len > 15)
                Py_RETURN_NONE;
            length = 0;
            for (Py_ssize_t j = 0; j < f[i].value_len; j++) {
                char c = f[i].value[j];
                if (c < '0' || c > '9')
                    Py_RETURN_NONE;
                length = length * 10 + (c - '0');
            }
            break;
        case K_TRANSFER_ENCODING:
            Py_RETURN_NONE;
        default:
            break;
        }
    }
    if (length < 0)
        Py_RETURN_NONE;
    Py_ssize_t body = end - after;
    int extra = 0;
    if ((long long)body > length) {
        body = (Py_ssize_t)length;
        extra = 1;
    }

    /* An upper bound: the status line grows by at most two bytes, each kept line by at most
     * one (": "), then Connection: close and the body bytes of this read. */
    out_t o;
    if (out_init(&o, (after - data) + n + 64 + body) < 0)
        return NULL;
    if (status == 200) {
        PUT_LIT(&o, "HTTP/1.1 200 OK\r\n");
    } else {
        PUT_LIT(&o, "HTTP/1.1 ");
        out_put(&o, d, 3);
        PUT_LIT(&o, " -\r\n");
    }
    for (int i = 0; i < n; i++) {
        enum kind k = f[i].kind;
        if (k == K_HOP || k == K_CONNECTION)
            continue;
        out_put(&o, f[i].name, f[i].name_len);
        PUT_LIT(&o, ": ");
        out_put(&o, f[i].value, f[i].value_len);
        PUT_LIT(&o, "\r\n");
    }
    if (!client_keep)
        PUT_LIT(&o, "Connection: close\r\n");
    PUT_LIT(&o, "\r\n");
    out_put(&o, after, body);
    PyObject *out = out_done(&o);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(iNLOO)", status, out, length - (long long)body,
                         close ? Py_False : Py_True, extra ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"request", (PyCFunction)(void (*)(void))heads_request, METH_FASTCALL,
     "request(data, client, tail, pool_enabled, max_headers, max_head_bytes) -> "
     "(upstream_head, host, keep_alive, url) or None"},
    {"response", (PyCFunction)(void (*)(void))heads_response, METH_FASTCALL,
     "response(data, client_keep) -> (status, out, left, upstream_keep, extra) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_heads",
    "The L7 proxy's simple request and answer heads in one call each (see the file's header).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__heads(void)
{
    static const char tchars[] = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        is_tchar[c] = (unsigned char)((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
                                      (c >= 'A' && c <= 'Z') || (c && strchr(tchars, c)));
        is_vchar[c] = (unsigned char)(c == '\t' || (c >= ' ' && c != 0x7f));
        is_urlchar[c] = (unsigned char)(c > ' ' && c < 0x7f);
    }
    return PyModule_Create(&module);
}
